"""Checkpoint save -> load: bit-identical logits; damaged files give one clear line."""

import json

import pytest
import torch
from tiny_models import rtn_swap, tiny_model

from owq.cli import main
from owq.kernels import OWQLinear
from owq.kernels.checkpoint import (
    CheckpointError,
    QuantConfig,
    base_fingerprint,
    load_checkpoint,
    save_checkpoint,
)

KINDS = ["llama", "opt", "gpt2"]


def saved(tmp_path, kind="llama", bits=3, group=32, weak=4):
    model = rtn_swap(tiny_model(kind), bits, group, weak)
    out = save_checkpoint(model, tmp_path / f"{kind}-ckpt", QuantConfig(bits, group))
    return model, out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits,group", [(3, 32), (4, -1), (2, 64)])
def test_save_load_bit_identical_logits(tmp_path, kind, bits, group):
    model, path = saved(tmp_path, kind, bits, group)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        loaded = load_checkpoint(path)
        after = loaded(ids).logits
    assert torch.equal(before, after)
    owq_layers = [m for m in loaded.modules() if isinstance(m, OWQLinear)]
    assert len(owq_layers) == 2 * {"llama": 7, "opt": 6, "gpt2": 4}[kind]
    assert base_fingerprint(loaded) == base_fingerprint(model)


def test_files_and_config(tmp_path):
    _, path = saved(tmp_path)
    names = sorted(p.name for p in path.iterdir())
    assert names == ["config.json", "model.safetensors"]
    quant = json.loads((path / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "owq" and quant["format_version"] == 1
    assert quant["bits"] == 3 and quant["group_size"] == 32 and len(quant["model_sha256"]) == 64
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_tied_head_not_stored_twice(tmp_path):
    from safetensors import safe_open

    _, path = saved(tmp_path, "llama")
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys


def test_existing_output_refused_and_kept(tmp_path):
    model, path = saved(tmp_path)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="exists"):
        save_checkpoint(model, path, QuantConfig(3, 32))
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    save_checkpoint(model, path, QuantConfig(3, 32), overwrite=True)
    assert load_checkpoint(path) is not None


def damage_truncate(path):
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def damage_missing(path):
    (path / "model.safetensors").unlink()


def damage_tamper(path):
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))


def damage_version(path):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "damage,needle",
    [
        (damage_truncate, "checksum"),
        (damage_missing, "missing model.safetensors"),
        (damage_tamper, "checksum"),
        (damage_version, "unknown format_version 99"),
    ],
)
def test_damaged_checkpoint_one_clear_line(tmp_path, capsys, damage, needle):
    _, path = saved(tmp_path)
    damage(path)
    with pytest.raises(CheckpointError, match=needle):
        load_checkpoint(path)
    assert main(["eval", str(path), "--max-windows", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("owq: error:")
    assert "Traceback" not in capsys.readouterr().err


def test_truncated_without_checksum_still_clear(tmp_path):
    _, path = saved(tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]["model_sha256"]
    (path / "config.json").write_text(json.dumps(config))
    damage_truncate(path)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)
