"""A CPU training loop keeps no memory per step (cnclip.host_memory): packed text batches, whose token
counts differ at nearly every step, leave the process' resident size flat once train() has started."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from cnclip import host_memory
from conftest import DEMO_RECIPE, REPO

# train() with its run replaced by `steps` packed-text forward/backward passes on the CPU (batch 128,
# every caption 2-16 tokens long: nearly every batch a new token count); prints VmRSS after each pass.
LOOP = textwrap.dedent("""
    import json, re, sys
    import torch
    from cnclip import trainer
    from cnclip.packed_text import encode_texts_packed

    def rss_mib():
        with open("/proc/self/status") as status:
            return int(re.search(r"VmRSS:\\s+(\\d+)", status.read()).group(1)) / 1024

    def run(self):
        from transformers import ChineseCLIPModel
        torch.set_num_threads(1)
        clip = ChineseCLIPModel.from_pretrained(sys.argv[1])
        clip.train()
        generator = torch.Generator().manual_seed(0)
        after = []
        for _ in range(int(sys.argv[2])):
            lengths = torch.randint(2, 17, (128,), generator=generator)
            mask = (torch.arange(16)[None] < lengths[:, None]).long()
            ids = torch.randint(5, 30, (128, 16), generator=generator) * mask
            emb = encode_texts_packed(clip, input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
            emb.square().sum().backward()
            clip.zero_grad(set_to_none=True)
            after.append(rss_mib())
        print(json.dumps(after))
        return {}

    trainer.FinetuneRun.run = run
    trainer.train(trainer.load_recipe(sys.argv[3], ["train.device=cpu"]))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS from /proc")
def test_packed_text_steps_on_a_cpu_keep_no_memory_per_step(tiny_model_dir, tmp_path):
    """Without the bound, oneDNN's per-shape kernels left ~0.4 MB resident per step here (~55 MB over these
    140 steps, measured); with it the size after step 20 and after step 160 differ by a few pages."""
    script = tmp_path / "loop.py"
    script.write_text(LOOP, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != host_memory.ONEDNN_CACHE_VARIABLE}  # train() decides
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, str(script), str(tiny_model_dir), "160", str(DEMO_RECIPE)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    after = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(after) == 160
    grown = max(after[20:]) - after[20]
    assert grown < 12, f"resident size grew {grown:.1f} MiB over 140 steps: {after[20]:.0f} -> {max(after[20:]):.0f}"


def test_a_capacity_the_user_set_is_left_alone(monkeypatch):
    monkeypatch.setenv(host_memory.ONEDNN_CACHE_VARIABLE, "256")
    assert not host_memory.bound_cpu_kernel_cache()
    assert os.environ[host_memory.ONEDNN_CACHE_VARIABLE] == "256"
    monkeypatch.delenv(host_memory.ONEDNN_CACHE_VARIABLE)
    assert host_memory.bound_cpu_kernel_cache()
    assert os.environ[host_memory.ONEDNN_CACHE_VARIABLE] == "0"
