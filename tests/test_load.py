"""The one loader (gpt.runs.load): a run directory, a checkpoint file, a LoRA run and ``hf:DIR`` give
the same model to sample.py, every ``gpt eval`` verb, the server, export, merge and the lm-eval
adapter; the context may only shrink; a bad reference is one line. A tiny random GPT-2 (2 layers,
width 32) saved by transformers, our checkpoint of it, and LoRA adapters over it."""

import re
import subprocess
import sys

import pytest
import torch
from helpers_hf import write_hf_gpt2_files

from gpt.checkpoint import checkpoint_state, save_checkpoint
from gpt.commands.eval import run as eval_run
from gpt.commands.export import export_main, merge_main
from gpt.commands.sample import sample_main
from gpt.commands.serve import run as serve_run
from gpt.errors import CheckpointError
from gpt.infer.config import ServeConfig
from gpt.lora import adapter_weights, apply_lora
from gpt.runs.load import base_location, load, weights_fingerprint
from gpt.serve.server import load_for_serving
from gpt.typed_config import REPO_ROOT

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
N_HF = 50257  # GPT-2's vocabulary; ours is padded to 50304


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """{"hf", "run", "file", "lora", "text"} references, the models they hold and token ids."""
    tmp = tmp_path_factory.mktemp("load")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64)
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf_model.save_pretrained(str(tmp / "gpt2"))
    write_hf_gpt2_files(tmp / "gpt2")
    hf = f"hf:{tmp / 'gpt2'}"
    base = load(hf)
    tok = base.tokenizer
    save_checkpoint(tmp / "run" / "ckpt.pt", checkpoint_state(base.weights, base.config, tok.to_state()))
    lora_model = base.build()
    apply_lora(lora_model, 2, 4.0, 0.0, ["c_attn"])
    with torch.no_grad():
        for name, p in lora_model.named_parameters():
            if "lora" in name:
                p.normal_(0, 0.5)  # adapters that change the output
    spec = {"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["c_attn"], "base": hf, "base_path":
            base_location(hf), "base_fingerprint": weights_fingerprint(base.weights)}  # fmt: skip
    lora_state = checkpoint_state(
        adapter_weights(lora_model.state_dict()), base.config, tok.to_state(), lora=spec
    )
    save_checkpoint(tmp / "lora" / "ckpt.pt", lora_state)
    (tmp / "text.txt").write_text("Hello world. The quick brown fox jumps over the lazy dog.\n" * 20)
    ids = torch.tensor([tok.encode("Hello, world: the quick brown fox")])
    with torch.no_grad():
        hf_logits, lora_logits = hf_model(ids).logits, lora_model.eval()(ids)[..., :N_HF]
    return {"hf": hf, "run": str(tmp / "run"), "file": str(tmp / "run" / "ckpt.pt"),
            "lora": str(tmp / "lora"), "text": str(tmp / "text.txt"), "ids": ids,
            "hf_logits": hf_logits, "lora_logits": lora_logits}  # fmt: skip


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids)[..., :N_HF]


def test_every_reference_gives_the_same_model(refs):
    ids = refs["ids"]
    for key in ("hf", "run", "file"):
        torch.testing.assert_close(
            logits(load(refs[key]).build(), ids), refs["hf_logits"], rtol=1e-4, atol=1e-4
        )
    lora = load(refs["lora"])
    assert lora.lora is not None and lora.adapter and lora.source.endswith("ckpt.pt") and lora.name == "lora"
    torch.testing.assert_close(logits(lora.build(), ids), refs["lora_logits"], rtol=1e-4, atol=1e-4)
    merged = load(refs["lora"], merge=True)
    assert merged.lora is None and "lora" in merged.state  # the checkpoint as saved, adapters folded
    torch.testing.assert_close(logits(merged.build(), ids), refs["lora_logits"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(refs["lora_logits"], refs["hf_logits"], atol=1e-3)


def test_the_context_may_only_shrink(refs):
    short = load(refs["run"], block_size=16)
    assert short.config.block_size == 16 and short.weights["transformer.wpe.weight"].shape[0] == 16
    ids = refs["ids"][:, :10]
    torch.testing.assert_close(logits(short.build(), ids), refs["hf_logits"][:, :10], rtol=1e-4, atol=1e-4)
    assert load(refs["lora"], block_size=16).build().config.block_size == 16
    for ref in (refs["hf"], refs["lora"]):
        with pytest.raises(
            CheckpointError, match=r"model.block_size=128 is larger than the 64 positions"
        ) as e:
            load(ref, block_size=128)
        assert "\n" not in str(e.value)


def test_sample_py_takes_hf_dir_like_a_run(refs, capsys):
    args = ["prompt=Hello", "max_new_tokens=8", "temperature=0", "device=cpu", "dtype=fp32"]
    done = subprocess.run([sys.executable, "sample.py", f"ckpt={refs['hf']}", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Hello") and len(done.stdout) > len("Hello")
    for key in ("run", "lora"):
        sample_main([f"ckpt={refs[key]}", *args])
        out = capsys.readouterr().out
        assert out.startswith("Hello")
        assert (out == done.stdout) == (key == "run")  # the adapters change the greedy text


def test_every_eval_verb_takes_every_reference(refs, capsys):
    data = f"data.path={refs['text']}"
    bpb = {key: eval_run(["bpb", f"ckpt={refs[key]}", data, "device=cpu", "dtype=fp32"])["bpb"]
           for key in ("hf", "run", "file", "lora")}  # fmt: skip
    assert bpb["hf"] == pytest.approx(bpb["run"], rel=1e-5) and bpb["run"] == bpb["file"]
    assert bpb["lora"] != pytest.approx(bpb["hf"], rel=1e-3)
    cloze = eval_run(["cloze", f"ckpt={refs['hf']}", data, "n=4", "device=cpu", "dtype=fp32"])
    assert 0 <= cloze["accuracy"] <= 1
    capsys.readouterr()


def test_serve_export_and_merge_take_hf_dir_and_lora_runs(refs, tmp_path, capsys):
    ids = refs["ids"]
    served = load_for_serving(ServeConfig(ckpt=refs["hf"], device="cpu", dtype="fp32"))
    assert served.name == "gpt2" and not served.chat_trained
    torch.testing.assert_close(logits(served.model, ids), refs["hf_logits"], rtol=1e-4, atol=1e-4)
    served = load_for_serving(ServeConfig(ckpt=refs["lora"], device="cpu", dtype="fp32"))
    torch.testing.assert_close(logits(served.model, ids), refs["lora_logits"], rtol=1e-4, atol=1e-4)

    export_main([f"ckpt={refs['hf']}", f"out={tmp_path / 'again'}", "check=true"])
    out = capsys.readouterr().out
    assert "vocab.json" in out and float(re.search(r"at most (\S+)", out).group(1)) < 1e-4
    again = load(f"hf:{tmp_path / 'again'}").build()
    torch.testing.assert_close(logits(again, ids), refs["hf_logits"], rtol=1e-4, atol=1e-4)

    merge_main([f"ckpt={refs['lora']}", f"out={tmp_path / 'merged'}"])
    merged = load(tmp_path / "merged")
    assert merged.lora is None and "lora" not in merged.state
    torch.testing.assert_close(logits(merged.build(), ids), refs["lora_logits"], rtol=1e-4, atol=1e-4)
    with pytest.raises(SystemExit):
        merge_main([f"ckpt={refs['hf']}", f"out={tmp_path / 'm2'}"])
    assert "has no LoRA adapters" in capsys.readouterr().err


def test_the_lm_eval_adapter_takes_hf_dir(refs):
    pytest.importorskip("lm_eval")
    from gpt.eval.lm_eval import GPTLM

    lm = GPTLM(ckpt=refs["hf"], device="cpu", dtype="fp32")
    torch.testing.assert_close(logits(lm.model, refs["ids"]), refs["hf_logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ref", ["hf:/no/such/dir", "/no/such/run"])
def test_a_bad_reference_is_one_line_everywhere(refs, ref, tmp_path, capsys):
    commands = [
        (sample_main, [f"ckpt={ref}", "device=cpu"]),
        (eval_run, ["bpb", f"ckpt={ref}", f"data.path={refs['text']}", "device=cpu"]),
        (eval_run, ["tasks", f"ckpt={ref}", "device=cpu"]),
        (eval_run, ["dialogs", f"ckpt={ref}", "device=cpu"]),
        (serve_run, [f"ckpt={ref}", "device=cpu"]),
        (export_main, [f"ckpt={ref}", f"out={tmp_path / 'x'}"]),
        (merge_main, [f"ckpt={ref}", f"out={tmp_path / 'y'}"]),
    ]
    for command, argv in commands:
        with pytest.raises(SystemExit) as e:
            command(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, (argv, err)
        assert "/no/such" in err, (argv, err)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
