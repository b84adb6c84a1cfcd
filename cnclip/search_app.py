"""The search web app that `cnclip serve INDEX` runs: one page, a small JSON API, thumbnails.

Built on Starlette (served by uvicorn) rather than Gradio: the page is one self-contained HTML file
with a few lines of script (no external URLs, works offline, easy to drive from a browser test), the
server is ~200 lines whose every route is visible here, and it adds two small packages instead of
Gradio's tree. Uploads are raw request bodies, so no multipart parser is needed either.

Safety, by construction:
* Only the Host names the server was started for are answered (Starlette's TrustedHostMiddleware, in
  front of every route): any other Host header gets a plain-text 400 "Invalid host header", so a web
  page that re-points its own name at this machine (DNS rebinding) cannot read the index or the
  images. allowed_hosts_for says which names a listening address allows.
* Nothing a response carries names an absolute path: /api/info gives the indexed roots' base names,
  results give the path relative to the indexed folder (or the image id), and a thumbnail that can
  no longer be read says so without saying where it was.
* Uploads are refused past `max_upload_bytes` (from Content-Length, and counted while streaming
  for a body that does not announce its size: reading stops at the limit). An upload is decoded in a
  worker thread, one at a time (thumbnails share that slot), by cnclip.images.decode_rgb under a
  budget of `max_upload_pixels` (40 megapixels, 8 bits a channel once decoded): the pixel count is
  checked from the header before decoding, a larger JPEG is decoded at 1/2, 1/4 or 1/8 scale when
  that fits, anything else larger gets 413. So the event loop never decodes, and decoding costs at
  most about 10 bytes a decoded pixel, 400 MB at the budget (peak RSS measured at 40 MP: RGBA PNG
  370 MB, CMYK JPEG 310, 16-bit grey PNG 270, RGB PNG 150).
* A thumbnail is addressed by its row number (ASCII digits only), never by a path: the path comes
  from the index and cnclip.search_index.read_payload keeps it inside the indexed roots and checks
  its digest.
* Every failure past the host check is a JSON `{"error": "..."}` with a 4xx status; the page shows
  the message and stays usable.

Concurrency: one process holds the model and the index once; at most `workers` model calls (queries,
uploads, zero-shot) run at a time, each in a worker thread, and further requests wait in the event loop
without holding a thread or a decoded image. Several processes (uvicorn's workers) would each hold their
own copy of the model and the index; the onnx backend's sessions run concurrently from threads instead,
and onnxruntime releases the GIL while it computes. With `workers` above 1 each call should use fewer
threads (cnclip serve gives each onnx session cores / workers), so the calls do not contend for cores.
"""

from __future__ import annotations

import html
import io
import ipaddress
import json
import logging
import re
import socket
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .counts import parse_count
from .errors import CnclipError, UsageError
from .images import ImageTooLarge, decode_rgb
from .prompts import load_templates, parse_classes
from .search_index import Searcher, read_payload

log = logging.getLogger("cnclip.serve")

DEFAULT_MAX_UPLOAD_MB = 10
# Decoded upload budget: 40 MP is 120 MB as 8-bit RGB and at most ~400 MB while decoding (10 bytes a pixel
# for RGBA, less for the rest); Pillow's own bomb limit (89 MP, cnclip.images.MAX_PIXELS) would allow twice that.
UPLOAD_MAX_PIXELS = 40_000_000
MAX_K = 100
THUMB_SIDE = 256
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
# A host name or IPv4 address, optionally `*.` in front (TrustedHostMiddleware's suffix pattern).
_HOST_NAME = re.compile(r"(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?")


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def host_pattern(value: str, option: str = "--allowed-host") -> str:
    """A Host name as TrustedHostMiddleware compares it: lower case, no port, an IPv6 address in brackets.

    UsageError, naming `option`, for anything else, and for `*` alone (that answers every Host, which is
    what lets a rebinding page in).
    """
    text = value.strip().lower()
    try:
        return f"[{ipaddress.IPv6Address(text.strip('[]'))}]"
    except ValueError:
        pass
    if text == "*":
        raise UsageError(f"{option} '*' would answer any Host header, so any web page could read this server "
                         "through DNS rebinding; name the hosts (a '*.example.com' suffix is allowed)")
    if not _HOST_NAME.fullmatch(text):
        raise UsageError(f"{option} {value!r}: give a host name or address as the browser sends it, without "
                         "scheme, port or path (e.g. photos.example.com, 192.168.1.20, [fd00::1], *.example.com)")
    return text


def allowed_hosts_for(bind_host: str, extra: Sequence[str] = ()) -> list[str]:
    """The Host header values answered by a server listening on `bind_host`, plus `extra` (--allowed-host).

    Always the address or name listened on (as the startup line prints it). Loopback (127.0.0.1, the
    default; ::1; localhost): also 127.0.0.1, localhost and [::1]. Every interface (0.0.0.0 or ::): those
    and this machine's host name (socket.gethostname()); the machine's network addresses and any other
    name it is reached by must be given with --allowed-host. Ports are not compared (TrustedHostMiddleware
    drops them). A rebinding page's requests carry its own name, never one of these.
    """
    try:
        address = ipaddress.ip_address(bind_host.strip("[]"))
        loopback, everywhere = address.is_loopback, address.is_unspecified
    except ValueError:
        loopback, everywhere = bind_host.lower() == "localhost", bind_host == ""
    hosts = list(LOOPBACK_HOSTS) if loopback or everywhere else []
    if bind_host:
        hosts.append(host_pattern(bind_host, "--host"))  # an address typed into the browser as printed
    if everywhere:
        name = socket.gethostname().lower()
        if _HOST_NAME.fullmatch(name):
            hosts.append(name)
    hosts += [host_pattern(h) for h in extra]
    return list(dict.fromkeys(hosts))


def classes_from_form(text: str):
    """A class list typed into the page: `key: 名称1, 名称2` lines, or just one name per line."""
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not any(sep in stripped for sep in (":", "：", "\t")):
            stripped = f"{stripped}: {stripped}"
        lines.append(stripped)
    return parse_classes("\n".join(lines), "class list")


def create_app(searcher: Searcher, *, classes_text: str = "", templates_path: str | None = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 2**20, default_k: int = 12,
               allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
               max_upload_pixels: int = UPLOAD_MAX_PIXELS, workers: int = 1) -> Starlette:
    """The app; `allowed_hosts` are TrustedHostMiddleware patterns (allowed_hosts_for makes them); at most
    `workers` model calls run at once."""
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    index = searcher.index
    templates = load_templates(templates_path)
    # At most `workers` model calls at a time (bounded memory, no thread contention); the rest wait in the loop.
    model_limiter = anyio.CapacityLimiter(workers)
    # One image decode at a time (uploads and thumbnails), waiting in the event loop rather than in a
    # worker thread, so decoding memory is bounded once instead of once per concurrent request.
    decode_limiter = anyio.CapacityLimiter(1)

    def results(hits, started: float) -> dict:
        return {"results": [{"rank": h.rank, "score": round(h.score, 4), "label": index.items[h.row].label,
                             "ref": h.ref, "thumb": f"/thumb/{h.row}"} for h in hits],
                "ms": round(1000 * (time.perf_counter() - started), 1)}

    def parse_k(request: Request) -> int:
        raw = request.query_params.get("k", str(default_k))
        try:
            k = int(raw)
        except ValueError:
            raise BadRequest(400, f"k must be a whole number, got {raw!r}") from None
        if not 1 <= k <= MAX_K:
            raise BadRequest(400, f"k must be between 1 and {MAX_K}, got {k}")
        return k

    def decode_upload(body: bytes):
        try:
            return decode_rgb(body, max_upload_pixels, shrink_jpeg=True)
        except ImageTooLarge as exc:
            raise BadRequest(413, f"the uploaded image is too large to search with ({exc}); a JPEG is decoded "
                                  f"at 1/2, 1/4 or 1/8 scale when that fits under {max_upload_pixels / 1e6:g} "
                                  "megapixels") from None
        except ValueError as exc:
            raise BadRequest(400, f"cannot read the uploaded file as an image ({exc})") from None

    async def read_upload(request: Request):
        announced = request.headers.get("content-length")
        size = None if announced is None else parse_count(announced)
        if announced is not None and size is None:
            raise BadRequest(400, f"Content-Length must be a number of bytes, got {announced[:40]!r}")
        if size is not None and size > max_upload_bytes:
            raise BadRequest(413, f"the upload is {size / 2**20:.1f} MB; the limit is "
                                  f"{max_upload_bytes / 2**20:.0f} MB")
        body = bytearray()
        async for chunk in request.stream():  # a body without Content-Length is counted as it arrives
            body.extend(chunk)
            if len(body) > max_upload_bytes:
                raise BadRequest(413, f"the upload is over the limit of {max_upload_bytes / 2**20:.0f} MB")
        if not body:
            raise BadRequest(400, "no image in the request: choose or drop an image file")
        return await anyio.to_thread.run_sync(decode_upload, bytes(body), limiter=decode_limiter)

    def guarded(handler):
        async def endpoint(request: Request):
            try:
                return await handler(request)
            except BadRequest as exc:
                return JSONResponse({"error": str(exc)}, status_code=exc.status)
            except CnclipError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
        return endpoint

    def locked(fn, *args):
        return anyio.to_thread.run_sync(fn, *args, limiter=model_limiter)

    async def page(request: Request):
        return HTMLResponse(render_page(index, classes_text, default_k, max_upload_bytes))

    async def info(request: Request):
        m = index.manifest
        return JSONResponse({"images": len(index), "kind": m["kind"], "model": model_name(m["model"]["spec"]),
                             "backend": searcher.embedder.backend, "workers": workers,
                             "roots": [Path(r).name for r in m["roots"]], "max_upload_bytes": max_upload_bytes,
                             "max_upload_pixels": max_upload_pixels})

    async def search_text(request: Request):
        started = time.perf_counter()
        query = request.query_params.get("q", "").strip()
        if not query:
            raise BadRequest(400, "type some text to search for")
        if len(query) > 1000:
            raise BadRequest(400, f"the query is {len(query)} characters long; at most 1000")
        k = parse_k(request)
        return JSONResponse(results(await locked(searcher.by_text, query, k), started))

    async def search_image(request: Request):
        started = time.perf_counter()
        k = parse_k(request)
        image = await read_upload(request)
        return JSONResponse(results(await locked(searcher.by_image, image, k), started))

    async def classify(request: Request):
        text = request.query_params.get("classes", "")
        try:
            classes = classes_from_form(text)
        except CnclipError as exc:
            raise BadRequest(400, str(exc)) from None
        image = await read_upload(request)
        top = await locked(searcher.classify, image, classes, templates, 5)
        return JSONResponse({"classes": top, "templates": len(templates)})

    @lru_cache(maxsize=512)
    def thumbnail(row: int) -> bytes:
        image = decode_rgb(read_payload(index.items[row]))
        image.thumbnail((THUMB_SIDE, THUMB_SIDE))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    async def thumb(request: Request):
        raw = request.path_params["row"]
        row = parse_count(raw)
        if row is None or row >= len(index):
            return JSONResponse({"error": f"no image {raw[:40]!r} in this index"}, status_code=404)
        try:
            data = await anyio.to_thread.run_sync(thumbnail, row, limiter=decode_limiter)
        except ValueError as exc:  # the reason names the indexed folder's absolute path: logged, not sent
            log.warning("thumbnail %d (%s): %s", row, index.items[row].ref, exc)
            return JSONResponse({"error": f"image {row} ({index.items[row].ref}) can no longer be read: it moved, "
                                          "changed or was deleted since indexing; rebuild the index"},
                                status_code=410)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    async def not_found(request: Request, exc):
        return JSONResponse({"error": f"nothing at {request.url.path}"}, status_code=404)

    host_check = Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts), www_redirect=False)
    return Starlette(exception_handlers={404: not_found}, middleware=[host_check], routes=[
        Route("/", page),
        Route("/api/info", info),
        Route("/api/search", guarded(search_text)),
        Route("/api/image", guarded(search_image), methods=["POST"]),
        Route("/api/classify", guarded(classify), methods=["POST"]),
        Route("/thumb/{row}", thumb),
    ])


def model_name(spec: str) -> str:
    """A model spec without its folders: a run directory's absolute path stays on the server."""
    return spec.rstrip("/").rsplit("/", 1)[-1]


def render_page(index, classes_text: str, default_k: int, max_upload_bytes: int) -> str:
    m = index.manifest
    subtitle = f"{len(index)} images · {m['kind']} index · model {model_name(m['model']['spec'])}"
    return (PAGE.replace("{{SUBTITLE}}", html.escape(subtitle))
            .replace("{{CLASSES}}", html.escape(classes_text))
            .replace("{{K}}", str(default_k))
            .replace("{{MAX_UPLOAD}}", json.dumps(max_upload_bytes)))


PAGE = """<!doctype html>
<html lang="zh-CN"><head><meta charset="utf-8"><title>cnclip 以文搜图</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,"Noto Sans CJK SC","WenQuanYi Micro Hei",sans-serif;margin:0;background:#f6f7f9;color:#222}
header{background:#1f3b57;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;font-size:13px;opacity:.8}
main{display:grid;grid-template-columns:320px 1fr;gap:20px;padding:20px 24px}
section{background:#fff;border-radius:8px;padding:14px;box-shadow:0 1px 3px rgba(0,0,0,.1);margin-bottom:16px}
h2{font-size:15px;margin:0 0 10px}input[type=text],textarea{width:100%;box-sizing:border-box;font-size:15px;padding:8px}
button{margin-top:8px;padding:7px 14px;font-size:14px;border:0;border-radius:5px;background:#2d6cdf;color:#fff;cursor:pointer}
#drop{border:2px dashed #9ab;border-radius:8px;padding:18px;text-align:center;color:#567;cursor:pointer}
#drop.over{background:#eef4ff}#preview{max-width:100%;max-height:140px;display:none;margin:8px auto 0}
#error{display:none;background:#fdecea;color:#8a1c12;border:1px solid #f5c2bd;padding:10px;border-radius:6px;margin-bottom:12px}
#status{font-size:13px;color:#555;margin-bottom:10px}
#results{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:14px}
.hit{background:#fff;border-radius:8px;padding:8px;box-shadow:0 1px 3px rgba(0,0,0,.12);font-size:13px}
.hit img{width:100%;height:150px;object-fit:contain;background:#fafafa;display:block}
.hit .label{margin-top:6px;word-break:break-all}.hit .score{color:#777}
#classes-result table{width:100%;font-size:13px;border-collapse:collapse}#classes-result td{padding:3px}
.bar{background:#2d6cdf;height:8px;border-radius:4px}
</style></head><body>
<header><h1>cnclip 以文搜图 · 以图搜图</h1><p>{{SUBTITLE}}</p></header>
<main><div>
<section><h2>文字搜索 Text search</h2>
<form id="text-form"><input id="query" type="text" placeholder="例如：红色连衣裙" autocomplete="off">
<label style="font-size:13px">top-k <input id="k" type="number" min="1" max="100" value="{{K}}" style="width:60px"></label>
<button id="search" type="submit">搜索 Search</button></form></section>
<section><h2>以图搜图 Image search</h2>
<div id="drop">拖入图片或点击选择<br>Drop an image here or click<input id="upload" type="file" accept="image/*" hidden></div>
<img id="preview" alt="uploaded image"></section>
<section><h2>零样本分类 Zero-shot classify</h2>
<textarea id="classes" rows="6" placeholder="每行一个类别，例如：&#10;猫&#10;狗&#10;car: 汽车, 轿车">{{CLASSES}}</textarea>
<button id="classify">分类上传的图片 Classify the uploaded image</button>
<div id="classes-result"></div></section>
</div><div>
<div id="error" role="alert"></div><div id="status">输入文字或上传图片开始搜索。</div>
<div id="results"></div></div></main>
<script>
const MAX_UPLOAD = {{MAX_UPLOAD}};
let lastImage = null;
const $ = id => document.getElementById(id);
function showError(msg){ const e=$('error'); e.textContent=msg; e.style.display=msg?'block':'none'; }
async function call(url, opts){
  showError('');
  let r; try { r = await fetch(url, opts); } catch(err){ showError('server not reachable: '+err); return null; }
  let body; try { body = await r.json(); } catch(err){ showError('bad response ('+r.status+')'); return null; }
  if(!r.ok){ showError(body.error || ('error '+r.status)); return null; }
  return body;
}
function show(data, what){
  const box=$('results'); box.innerHTML='';
  data.results.forEach(h=>{
    const d=document.createElement('div'); d.className='hit'; d.dataset.ref=h.ref;
    const img=document.createElement('img'); img.className='thumb'; img.src=h.thumb; img.alt=h.label; img.dataset.ref=h.ref;
    const l=document.createElement('div'); l.className='label'; l.textContent=h.rank+'. '+h.label;
    const s=document.createElement('div'); s.className='score'; s.textContent='score '+h.score.toFixed(3);
    d.append(img,l,s); box.append(d);
  });
  $('status').textContent = data.results.length+' results for '+what+' ('+data.ms+' ms)';
}
$('text-form').addEventListener('submit', async ev=>{
  ev.preventDefault();
  const q=$('query').value.trim(); if(!q){ showError('type some text to search for'); return; }
  const data=await call('/api/search?q='+encodeURIComponent(q)+'&k='+encodeURIComponent($('k').value));
  if(data) show(data, '“'+q+'”');
});
async function searchImage(file){
  if(file.size > MAX_UPLOAD){ showError('the file is '+(file.size/1048576).toFixed(1)+' MB; the limit is '+(MAX_UPLOAD/1048576).toFixed(0)+' MB'); return; }
  lastImage=file; const p=$('preview'); p.src=URL.createObjectURL(file); p.style.display='block';
  const data=await call('/api/image?k='+encodeURIComponent($('k').value), {method:'POST', body:file});
  if(data) show(data, 'the uploaded image');
}
const drop=$('drop');
drop.addEventListener('click', ()=>$('upload').click());
$('upload').addEventListener('change', ev=>{ if(ev.target.files.length) searchImage(ev.target.files[0]); });
drop.addEventListener('dragover', ev=>{ ev.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', ()=>drop.classList.remove('over'));
drop.addEventListener('drop', ev=>{ ev.preventDefault(); drop.classList.remove('over'); if(ev.dataTransfer.files.length) searchImage(ev.dataTransfer.files[0]); });
$('classify').addEventListener('click', async ()=>{
  if(!lastImage){ showError('upload an image first (Image search)'); return; }
  const data=await call('/api/classify?classes='+encodeURIComponent($('classes').value), {method:'POST', body:lastImage});
  if(!data) return;
  const table=document.createElement('table');
  data.classes.forEach(c=>{
    const tr=table.insertRow(); const pct=(100*c.probability).toFixed(1)+'%';
    tr.insertCell().textContent=c.name;
    const bar=document.createElement('div'); bar.className='bar'; bar.style.width=pct;
    const cell=tr.insertCell(); cell.style.width='50%'; cell.append(bar);
    tr.insertCell().textContent=pct;
  });
  const out=$('classes-result'); out.innerHTML=''; out.append(table);
  const note=document.createElement('div'); note.style.cssText='font-size:12px;color:#777';
  note.textContent=data.templates+' templates'; out.append(note);
});
</script></body></html>
"""
