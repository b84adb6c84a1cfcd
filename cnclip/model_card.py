"""What ModelScope reads beside the weights: configuration.json and a README.md model card.

Everything in the card comes from the run directory (recipe.yaml, best/metrics.json,
summary.json): the numbers are the ones training measured, never typed in by hand.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePath

import yaml

from .models import MODELSCOPE_PREFIX

TASK = "multi-modal-embedding"
# ModelScope's registry names for CLIP-style models; see DESIGN.md "ModelScope facts".
MODEL_TYPE = "clip-multi-modal-embedding"
# OFA-Sys's transformers checkpoints as ModelScope mirrors them.
MODELSCOPE_MIRROR_OWNER = "AI-ModelScope"
OFA_OWNER = "OFA-Sys"
DIRECTIONS = (("text_to_image", "text → image"), ("image_to_text", "image → text"))


def configuration_json() -> dict:
    """The minimum ModelScope wants: framework, task, model type and pipeline."""
    return {
        "framework": "pytorch",
        "task": TASK,
        "model": {"type": MODEL_TYPE},
        "pipeline": {"type": TASK},
    }


@dataclass
class RunMetrics:
    """Validation numbers of the exported checkpoint, as the training loop recorded them."""

    split: str | None
    epoch: int | None
    step: int | None
    valid: dict | None  # evaluate.retrieve() metrics; None when the run had no validation split
    before: dict | None  # the base model on the same split, when eval.before_training was on


def read_run_metrics(run_dir: Path, weights_from_best: bool) -> RunMetrics | None:
    """Metrics of best/ (the checkpoint exported by default); None when the weights came from elsewhere."""
    best = run_dir / "best" / "metrics.json"
    if not weights_from_best or not best.is_file():
        return None
    saved = json.loads(best.read_text(encoding="utf-8"))
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    return RunMetrics(split=saved.get("split"), epoch=saved.get("epoch"), step=saved.get("step"),
                      valid=saved.get("valid"), before=summary.get("before"))


def base_model_id(spec: str) -> str | None:
    """The ModelScope id of the base model for the card's front matter; None for a local directory.

    A local path means nothing to a reader of the hub page (and may reveal a home directory).
    """
    if spec.startswith(MODELSCOPE_PREFIX):
        return spec[len(MODELSCOPE_PREFIX):]
    if os.path.isabs(spec) or Path(spec).exists() or spec.count("/") != 1:
        return None
    owner, name = spec.split("/")
    return f"{MODELSCOPE_MIRROR_OWNER}/{name}" if owner == OFA_OWNER else spec


def public_recipe_text(recipe: dict) -> str:
    """The recipe as YAML, absolute local paths cut to their last component (they are machine-specific)."""

    def scrub(value):
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        if isinstance(value, str) and os.path.isabs(value):
            return f".../{PurePath(value).name}"
        if isinstance(value, str):  # open_clip:local-dir:/abs/dir, open_clip:ARCH@/abs/file.pt
            for marker in ("local-dir:", "@"):
                head, found, tail = value.partition(marker)
                if found and head.startswith("open_clip:") and os.path.isabs(tail):
                    return f"{head}{marker}.../{PurePath(tail).name}"
        return value

    return yaml.safe_dump(scrub(recipe), allow_unicode=True, sort_keys=False).rstrip()


@dataclass
class CardInputs:
    title: str
    repo_id: str | None  # owner/name on ModelScope when known at export time
    recipe: dict  # the run's recipe.yaml, as a mapping
    metrics: RunMetrics | None
    dataset: str  # name for the front matter (a hub id when the user gave one)
    license: str
    checkpoint: str  # which checkpoint was exported, in words
    # Layout of the weights: "transformers", "modelscope" or "cn_clip" (cnclip.exporter.FORMATS).
    format: str = "transformers"
    # The original-format file names / architecture, for the usage text of those layouts.
    original: dict | None = None
    # File name of the validation-recall plot copied beside the card (cnclip.plots), or None.
    recall_plot: str | None = None
    # WiSE-FT (cnclip.wise): {"alpha", "rule_text", "picked": whether the run's rule chose it (else
    # `cnclip export --alpha`), "picked_alpha", "table": wise.json's metrics, "plot": file name or None}.
    wise: dict | None = None
    # An open_clip image tower's export (cnclip.open_clip_export.write_open_clip_export's record): the card
    # shows how to load image/ with open_clip and text/ with transformers.
    open_clip: dict | None = None


def wise_line(wise: dict | None) -> str:
    """The card's bullet saying which WiSE-FT alpha the exported weights are at."""
    if not wise:
        return ""
    if wise["picked"]:
        how = f"picked by rule {wise['rule_text']}"
    elif wise["picked_alpha"] is None:
        how = "set at export (`--alpha`)"
    else:
        how = f"set at export (`--alpha`); the run's rule picked {wise['picked_alpha']:g}"
    return (f"- WiSE-FT alpha {wise['alpha']:g} {how}: the weights are the base model's plus {wise['alpha']:g} "
            "times the fine-tuning update (0 = base model, 1 = fine-tuned)\n")


def wise_section(wise: dict | None) -> str:
    """The WiSE-FT curve: validation mean recall and zero-shot top-1 at each alpha the run swept."""
    if not wise or not wise.get("table"):
        return ""
    lines = ["## WiSE-FT", "", "Validation at each alpha between the base model (0) and the fine-tuned one (1), "
             "measured by cnclip after training:", "", "| alpha | mean recall | zero-shot top-1 |", "|---:|---:|---:|"]
    for row in wise["table"]:
        z = row["valid"].get("zeroshot")
        mark = " (exported)" if row["alpha"] == wise["alpha"] else ""
        top1 = f"{z['top1']:.2f}" if z else "-"
        lines.append(f"| {row['alpha']:g}{mark} | {row['valid']['mean_recall']:.2f} | {top1} |")
    if wise.get("plot"):
        lines += ["", f"![mean recall and zero-shot top-1 against the WiSE-FT alpha]({wise['plot']})"]
    return "\n".join(lines) + "\n\n"


def front_matter(inputs: CardInputs) -> dict:
    model = inputs.recipe.get("model", {})
    meta: dict = {
        "tasks": [TASK],
        "license": inputs.license,
        "language": ["zh"],
        "frameworks": ["pytorch"],
    }
    # A composed model has no base checkpoint: model.base then holds its unused default, not an ancestor.
    base = None if model.get("compose") else base_model_id(str(model.get("base", "")))
    if base:
        meta["base_model"] = [base]
    meta["datasets"] = {"train": [inputs.dataset]}
    if inputs.metrics and inputs.metrics.valid:
        meta["datasets"]["evaluation"] = [inputs.dataset]
    meta["tags"] = ["chinese-clip", "clip", "lora", "cnclip", "image-text-retrieval"]
    return meta


def _recall_rows(metrics: dict, label: str) -> list[str]:
    rows = []
    for key, name in DIRECTIONS:
        m = metrics[key]
        rows.append(f"| {name}{label} | {m['r1']:.2f} | {m['r5']:.2f} | {m['r10']:.2f} | {m['mean_recall']:.2f} |")
    return rows


def evaluation_section(metrics: RunMetrics | None, dataset: str, plot: str | None = None) -> str:
    if metrics is None or not metrics.valid:
        reason = ("the run had no validation split (data.valid_split: null)" if metrics is not None
                  else "the exported checkpoint has no recorded validation metrics")
        return ("## Evaluation\n\nNo retrieval metrics: " + reason + ". Evaluate the model with\n"
                "`python -m cnclip.evaluate MODEL_DIR --data DATA_DIR --split valid` before relying on it.\n")
    v = metrics.valid
    lines = [
        "## Evaluation",
        "",
        f"Retrieval on the `{metrics.split}` split of `{dataset}` ({v.get('num_texts', '?')} texts, "
        f"{v.get('num_images', '?')} images), measured by cnclip at the end of epoch {metrics.epoch} "
        f"(step {metrics.step}), the checkpoint exported here. Recall@K is the percentage of queries with a "
        "correct match among the top K; mean recall averages R@1, R@5 and R@10.",
        "",
        "| direction | R@1 | R@5 | R@10 | mean recall |",
        "|---|---:|---:|---:|---:|",
        *_recall_rows(v, ""),
    ]
    if metrics.before:
        lines += _recall_rows(metrics.before, " (base model, before fine-tuning)")
    lines += ["", f"Mean recall over both directions: **{v['mean_recall']:.2f}**"
              + (f" (base model before fine-tuning: {metrics.before['mean_recall']:.2f})." if metrics.before else ".")]
    if plot:
        lines += ["", f"![validation mean recall per epoch, both directions; dashed: before fine-tuning]({plot})"]
    return "\n".join(lines) + "\n"


def usage_snippet(repo_id: str | None, context_length: int) -> str:
    source = (f'snapshot_download("{repo_id}")' if repo_id
              else 'snapshot_download("OWNER/NAME")  # or the path of a local copy of this directory')
    return f'''```python
import torch
from PIL import Image
from modelscope import snapshot_download
from transformers import ChineseCLIPModel, ChineseCLIPProcessor

model_dir = {source}
model = ChineseCLIPModel.from_pretrained(model_dir).eval()
processor = ChineseCLIPProcessor.from_pretrained(model_dir)

texts = ["一张猫的照片", "一张狗的照片"]
image = Image.open("example.jpg")
with torch.no_grad():
    text_inputs = processor(text=texts, padding=True, truncation=True, max_length={context_length}, return_tensors="pt")
    image_inputs = processor(images=image, return_tensors="pt")
    text_emb = model.get_text_features(**text_inputs)
    image_emb = model.get_image_features(**image_inputs)
# transformers 5 returns an output object whose pooler_output is the embedding; 4.x returns the tensor
text_emb = getattr(text_emb, "pooler_output", text_emb)
image_emb = getattr(image_emb, "pooler_output", image_emb)
text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
print((image_emb @ text_emb.T).softmax(dim=-1))  # which caption fits the image
```'''


def _named(spec: str) -> str:
    from .open_clip_reference import LOCAL_DIR, OPEN_CLIP_PREFIX, is_open_clip_reference

    if is_open_clip_reference(spec):  # a local path is named by its last part only, as below
        body = spec.strip()[len(OPEN_CLIP_PREFIX):]
        if body.startswith(LOCAL_DIR):
            return f"the open_clip model `{PurePath(body[len(LOCAL_DIR):]).name}` (a local directory)"
        architecture, _, weights = body.partition("@")
        if "/" in weights or "\\" in weights or weights.startswith((".", "~")):
            return f"open_clip `{architecture}` with the weights `{PurePath(weights).name}` (a local file)"
        return f"open_clip `{body}`"
    return f"`{base_model_id(spec)}`" if base_model_id(spec) else f"`{PurePath(spec).name}` (a local directory)"


def original_usage(inputs: CardInputs, context_length: int) -> tuple[str, str]:
    """(usage, files table rows) of an export in ModelScope's or cn_clip's original layout."""
    original = inputs.original or {}
    if inputs.format == "modelscope":
        source = inputs.repo_id or "MODEL_DIR"
        usage = f'''```python
from modelscope.pipelines import pipeline
from modelscope.utils.constant import Tasks
from PIL import Image

pipe = pipeline(Tasks.multi_modal_embedding, model="{source}")
img_emb = pipe.forward({{"img": Image.open("example.jpg")}})["img_embedding"]       # L2-normalised
text_emb = pipe.forward({{"text": ["一张猫的照片", "一张狗的照片"]}})["text_embedding"]  # L2-normalised
print((img_emb @ text_emb.T).softmax(dim=-1))
```'''
        files = ("| `pytorch_model.bin` | the weights (fp16) with the original Chinese-CLIP names, LoRA merged |\n"
                 "| `vision_model_config.json`, `text_model_config.json` | the architecture, as ModelScope's CLIP reads it |\n"
                 "| `vocab.txt` | the BERT vocabulary |\n")
        return usage, files
    name = original.get("file", "model.pt")
    usage = f'''```python
# pip install cn_clip
from cn_clip.clip.utils import load_from_name
model, preprocess = load_from_name("{name}", device="cpu", vision_model_name="{original.get('vision', 'VISION')}",
                                   text_model_name="{original.get('text', 'TEXT')}",
                                   input_resolution={original.get('resolution', 224)})
```'''
    files = (f"| `{name}` | cn_clip checkpoint (`epoch`, `step`, `name`, `state_dict` with `module.` names; fp16), LoRA merged |\n"
             "| `vocab.txt` | the BERT vocabulary (cn_clip's own tokenizer ships the same 21,128-token file) |\n")
    return usage, files


def original_context_note(fmt: str, context_length: int) -> str:
    """How to tokenise at the trained context in the original layouts, whose configs have no key for it:
    cn_clip takes it per call (`clip.tokenize(texts, context_length=N)`, default 52); ModelScope's CLIP
    pipeline always tokenises at 52 (its preprocessor's default, which no configuration key changes)."""
    if fmt == "modelscope":
        if context_length <= 52:
            return "ModelScope's pipeline tokenises at 52 tokens, which covers that."
        return (f"ModelScope's pipeline always cuts captions at 52 tokens (no configuration key changes that): "
                f"for the trained {context_length}, load `pytorch_model.bin` with cn_clip and tokenise with "
                f"`clip.tokenize(texts, context_length={context_length})`.")
    return f"Tokenise with `clip.tokenize(texts, context_length={context_length})` (cn_clip's default is 52)."


def open_clip_usage(repo_id: str | None, context_length: int) -> str:
    """How to embed with an open_clip export: image/ through open_clip, text/ through transformers."""
    source = (f'snapshot_download("{repo_id}")' if repo_id
              else 'snapshot_download("OWNER/NAME")  # or the path of a local copy of this directory')
    return f'''```python
# pip install open_clip_torch transformers modelscope
import open_clip
import torch
from PIL import Image
from modelscope import snapshot_download
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

model_dir = {source}
image_model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{{model_dir}}/image")
text_model = AutoModel.from_pretrained(f"{{model_dir}}/text", add_pooling_layer=False).eval()
tokenizer = AutoTokenizer.from_pretrained(f"{{model_dir}}/text")
projection = load_file(f"{{model_dir}}/text/text_projection.safetensors")["weight"]

texts = ["一张猫的照片", "一张狗的照片"]
with torch.no_grad():
    image_emb = image_model.eval().encode_image(preprocess(Image.open("example.jpg")).unsqueeze(0))
    tokens = tokenizer([t.lower() for t in texts], padding=True, truncation=True, max_length={context_length},
                       return_tensors="pt")
    text_emb = text_model(**tokens).last_hidden_state[:, 0] @ projection.T  # [CLS] state, projected
image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
print((image_emb @ text_emb.T).softmax(dim=-1))  # which caption fits the image
```'''


def render_open_clip_card(inputs: CardInputs, front: str, base_text: str, tuning: str, context_length: int) -> str:
    info = inputs.open_clip or {}
    return f"""---
{front}
---

# {inputs.title}

A Chinese text encoder trained with cnclip against the locked open_clip image tower
`{info.get('architecture', '?')}` (LiT recipe): {tuning} under a symmetric contrastive loss, against the image
tower's cached embeddings. The image tower is published as open_clip loads it (`image/`), the text tower as
transformers loads it (`text/`); their embeddings ({info.get('embed_dim', '?')} dimensions) share one space.

- base model: {base_text}
- exported from: the run's {inputs.checkpoint}
{wise_line(inputs.wise)}
{evaluation_section(inputs.metrics, inputs.dataset, inputs.recall_plot)}
{wise_section(inputs.wise)}
## Usage

{open_clip_usage(inputs.repo_id, context_length)}

Images go through open_clip's own preprocessing (`preprocess` above, {info.get('image_size', '?')} pixels), as in
training. Captions were {context_length} tokens long in training (counting [CLS] and [SEP]); keep `max_length`
at that. cnclip lower-cases captions and turns “ ” into " before tokenising. cnclip's own commands
(`cnclip evaluate`, `zeroshot`, `search`) take this directory as it is. When it was written, both folders were
loaded back this way and embedded like the trained run (max abs diff {info.get('round_trip_max_abs_diff', float('nan')):.1e}).

## Files

| file | what |
|---|---|
| `image/open_clip_config.json`, `image/open_clip_model.safetensors` | the open_clip model the image tower comes from (its own text tower included), unchanged: `open_clip.create_model_and_transforms("local-dir:image")` |
| `text/config.json`, `text/model.safetensors` | the trained Chinese text tower, a transformers `BertModel` (LoRA merged in) |
| `text/tokenizer.json`, `text/tokenizer_config.json`, `text/vocab.txt` | its BERT tokenizer |
| `text/text_projection.safetensors` | `weight`: the text projection (embedding = [CLS] state @ weight.T); `logit_scale`: the trained log temperature |
| `configuration.json` | ModelScope task metadata |

## Training recipe

```yaml
{public_recipe_text(inputs.recipe)}
```
"""


def render_card(inputs: CardInputs) -> str:
    recipe = inputs.recipe
    model = recipe.get("model", {})
    data = recipe.get("data", {})
    base = str(model.get("base", ""))
    base_text = _named(base)
    compose = model.get("compose")
    if compose:
        base_text = (f"composed by cnclip from the image tower of {_named(str(compose.get('image', '')))} and the "
                     f"text encoder {_named(str(compose.get('text', '')))} (new text projection)")
    if model.get("random_init"):
        base_text += ", randomly initialised from its config: a demo, not a pretrained model"
    targets = ", ".join(model.get("target_modules", []))
    context_length = int(data.get("context_length", 52))
    front = yaml.safe_dump(front_matter(inputs), allow_unicode=True, sort_keys=False).rstrip()
    if model.get("text_tuning") == "full":
        tuning = "the whole text tower was trained"
    else:
        tuning = f"the text tower was trained with LoRA (r={model.get('lora_r')}, alpha={model.get('lora_alpha')}, on {targets})"
    if inputs.open_clip is not None:
        return render_open_clip_card(inputs, front, base_text, tuning, context_length)
    if inputs.format != "transformers":
        usage, files = original_usage(inputs, context_length)
        return f"""---
{front}
---

# {inputs.title}

A Chinese CLIP fine-tuned for image-text retrieval with cnclip, in the original Chinese-CLIP
({inputs.format}) layout. The image tower of the base model was kept frozen; {tuning} under a
symmetric contrastive loss. Captions are lower-cased and “ ” become " before tokenising, as cn_clip does.

- base model: {base_text}
- exported from: the run's {inputs.checkpoint}
{wise_line(inputs.wise)}
{evaluation_section(inputs.metrics, inputs.dataset, inputs.recall_plot)}
{wise_section(inputs.wise)}
## Usage

{usage}

Captions were {context_length} tokens long in training (counting [CLS] and [SEP]). {original_context_note(inputs.format, context_length)}
Images are resized to a square (bicubic) and normalised with the OpenAI CLIP mean/std, as cn_clip's own transform does.

## Files

| file | what |
|---|---|
{files}| `configuration.json` | ModelScope task metadata |

## Training recipe

```yaml
{public_recipe_text(recipe)}
```
"""
    return f"""---
{front}
---

# {inputs.title}

A Chinese CLIP (transformers `ChineseCLIPModel`) fine-tuned for image-text retrieval with cnclip.
The image tower of the base model was kept frozen; {tuning}
under a symmetric contrastive loss. The trained text tower is in `model.safetensors` (LoRA merged in), so the
model loads with plain transformers; a LoRA run's bare adapter is in `adapter/`.

- base model: {base_text}
- exported from: the run's {inputs.checkpoint}
{wise_line(inputs.wise)}
{evaluation_section(inputs.metrics, inputs.dataset, inputs.recall_plot)}
{wise_section(inputs.wise)}
## Usage

{usage_snippet(inputs.repo_id, context_length)}

Captions were {context_length} tokens long in training (counting [CLS] and [SEP]); keep `max_length` at that.
`configuration.json` files the model under ModelScope's `{TASK}` task, but the weights are in transformers
format: load them as above (or with `from modelscope import AutoModel`), not with ModelScope's own
`pipeline("{TASK}")`, which expects the original Chinese-CLIP checkpoint layout.

## Files

| file | what |
|---|---|
| `model.safetensors`, `config.json` | the full model, LoRA merged into the text tower |
| `tokenizer.json`, `tokenizer_config.json`, `vocab.txt` | the base model's BERT tokenizer |
| `preprocessor_config.json` | the base model's image preprocessing |
| `adapter/` | the LoRA adapter alone (peft format) for use on top of the base model; it does not carry the trained logit scale, which only scales similarities and leaves embeddings and rankings unchanged |
| `configuration.json` | ModelScope task metadata |

## Training recipe

```yaml
{public_recipe_text(recipe)}
```
"""
