"""Untrusted inputs run no code: configs are parsed by a safe YAML loader, checkpoints and converted models are
read as safetensors and JSON only (a pickled `pytorch_model.bin` is refused without being opened, and an index
cannot point outside its folder), and no code path unpickles, evaluates or hands a string to a shell — checked
over the sources, since one careless `torch.load` would undo the rest."""

import json
import pickle
import re
from pathlib import Path

import pytest

from pretrain.config import ConfigError, load_config
from tools.convert_hf import import_hf
from tools.hf import ConversionError

ROOT = Path(__file__).parents[2]
PACKAGES = ("pretrain", "parallel", "data", "cluster", "tools")
FORBIDDEN = {
    r"\bpickle\.loads?\(|\bimport pickle\b|\bmarshal\.loads?\(|\bshelve\.open\(": "unpickling",
    r"torch\.load\((?![^)]*weights_only=True)": "torch.load without weights_only=True",
    r"yaml\.(unsafe_)?load\((?![^)]*Loader=yaml\.SafeLoader)|yaml\.full_load\(": "a YAML loader that builds objects",
    r"shell=True|os\.system\(|os\.popen\(": "a command line through a shell",
    r"(?<![\w.])(eval|exec)\(": "eval/exec",
}


class Planted:
    """Unpickling this creates a file: the proof that something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_no_source_file_unpickles_evaluates_or_uses_a_shell():
    found = []
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            for number, line in enumerate(file.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                found += [f"{file.relative_to(ROOT)}:{number}: {why}: {line.strip()}"
                          for pattern, why in FORBIDDEN.items() if re.search(pattern, code)]
    assert not found, "\n".join(found)


def test_a_config_cannot_build_python_objects(tmp_path):
    marker = tmp_path / "ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f"train:\n  steps: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="could not determine a constructor for the tag .*python/object"):
        load_config(config, check_paths=False)
    assert not marker.exists()


def test_a_pickled_model_folder_is_refused_without_being_opened(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 64,
                                                   "hidden_size": 16, "num_hidden_layers": 1,
                                                   "num_attention_heads": 2, "num_key_value_heads": 2,
                                                   "intermediate_size": 32, "max_position_embeddings": 32}))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(ConversionError, match="pytorch_model.bin are not read"):
        import_hf(folder, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()

    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../elsewhere.safetensors"}}))
    with pytest.raises(ConversionError, match="outside the folder"):
        import_hf(folder, tmp_path / "out")
