"""Hugging Face export and import of dense GQA models as transformers' `LlamaForCausalLM`, of GQA + sigmoid MoE models
as `Glm4MoeForCausalLM` (tools/hf/glm4_moe_config.py, tools/hf/moe_names.py), of GQA + softmax top-k MoE models as
`MixtralForCausalLM` (tools/hf/mixtral_config.py, tools/hf/mixtral_names.py) and of MLA + MoE models as
`DeepseekV3ForCausalLM` (tools/hf/deepseek_v3_config.py, tools/hf/mla_rope.py); the MoE models' MTP modules in
DeepSeek-V3's layout (tools/hf/mtp_names.py), which transformers' `generate(use_mtp=True)` drafts with. Offline, one
process.

    pretrain convert export-hf CHECKPOINT OUT_DIR [--dtype keep|fp32|bf16] [--shard-size 5GB] [--verify]
                               [--mtp keep|drop]
    pretrain convert import-hf HF_DIR OUT_CHECKPOINT

Export streams the checkpoint's whole tensors one at a time (pretrain/consolidate.py) under Llama's names
(tools/hf/names.py) into `model.safetensors` (or numbered files and an index), with `config.json`
(tools/hf/llama_config.py), `generation_config.json`, the tokenizer files (tools/hf/tokenizer_files.py) and
`conversion.json` (what was mapped how; with --verify the logits measured through transformers). Import reads a
model folder's safetensors as memory-mapped views (tools/hf/safetensors_folder.py) into an ordinary
checkpoint folder, its config.yaml generated and the folder's tokenizer.json copied next to it and recorded, for
`--init-from`, `pretrain eval` and `pretrain generate`. Both write into a hidden sibling folder renamed into place at
the end: an existing OUT is an error, and a failure leaves no OUT.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from data.tokenizer import BOS, EOS, PAD, tokenizer_sha256
from pretrain.checkpoint import (
    MODEL,
    CheckpointManager,
    CheckpointMeta,
    model_templates,
    read_meta,
    step_dir_name,
)
from pretrain.config import Config, ConfigError, DataConfig, config_to_yaml, load_config, validate
from pretrain.consolidate import iter_full_tensors, write_safetensors
from pretrain.lora_checkpoint import LORA_BASE, is_adapter_checkpoint
from pretrain.model.config import ModelConfig
from tools.hf import (
    ConversionError,
    deepseek_v3_config,
    glm4_moe_config,
    mixtral_config,
    mixtral_names,
    mla_rope,
    moe_names,
    mtp_names,
)
from tools.hf.llama_config import (
    ARCHITECTURE,
    check_rope_with_transformers,
    from_llama_config,
    refuse_unexportable,
    to_llama_config,
)
from tools.hf.names import from_hf, mapping_table, to_hf
from tools.hf.safetensors_folder import LazyTensor, MappedFiles, StoredTensor, read_folder
from tools.hf.tokenizer_files import generation_config, special_ids, write_tokenizer_files

IMPORT_STEP = 0


@contextmanager
def atomic_folder(out: Path, inner: str | None = None) -> Iterator[Path]:
    """A hidden sibling of `out` to write into; when the block completes, it (or its subfolder `inner`) becomes
    `out`; whatever happens, nothing else of it remains."""
    if out.exists() or out.is_symlink():
        raise ConversionError(f"{out} exists: choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
        os.rename(work / inner if inner else work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _dump(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def _model_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in model_templates(model.build()).items()}


def _check_stored(meta: CheckpointMeta, model: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The checkpoint's model tensors, which must be exactly those of its config's model."""
    stored = {k.removeprefix(MODEL): v for k, v in meta.tensor_shapes().items() if k.startswith(MODEL)}
    wanted = _model_shapes(model)
    wrong = sorted(set(stored) ^ set(wanted)) + [k for k in wanted if k in stored and stored[k][0] != wanted[k]]
    if wrong:
        raise ConversionError(f"{meta.path} does not hold the tensors of its config.yaml's model: {wrong[:6]}")
    return stored


def _source_meta(checkpoint: Path) -> tuple[CheckpointMeta, Config]:
    meta = read_meta(checkpoint)
    if is_adapter_checkpoint(meta):
        raise ConversionError(f"{meta.path} holds LoRA adapters only (its base: {meta.state[LORA_BASE].get('path')}): "
                              f"run `pretrain checkpoint merge {meta.path} MERGED` first and export MERGED")
    cfg = load_config(meta.path / "config.yaml", check_paths=False)
    if cfg.model.attention == "mla":
        deepseek_v3_config.refuse_unexportable_mla(cfg.model, str(meta.path))
    elif _is_mixtral(cfg.model):
        mixtral_config.refuse_unexportable_mixtral(cfg.model, str(meta.path))
    elif cfg.model.moe.enabled:
        glm4_moe_config.refuse_unexportable_moe(cfg.model, str(meta.path))
    else:
        refuse_unexportable(cfg.model, str(meta.path))
    return meta, cfg


def _is_mixtral(model: ModelConfig) -> bool:
    """GQA + softmax top-k MoE: exported as MixtralForCausalLM (or refused by its reasons)."""
    return model.attention == "gqa" and model.moe.enabled and model.moe.score_func == "softmax"


def _nonzero_selection_biases(meta: CheckpointMeta) -> list[str]:
    """Our MoE layers whose stored selection bias (`router.expert_bias`) is not all zero, read before writing."""
    from safetensors import safe_open

    from pretrain.consolidate import _chunks_by_tensor

    nonzero = []
    for name, chunks in sorted(_chunks_by_tensor(meta.shards).items()):
        if name.startswith(MODEL) and name.endswith(mixtral_names.SELECTION_BIAS):
            for file, _ in chunks:
                with safe_open(file, framework="pt") as f:
                    if f.get_tensor(name).any():
                        nonzero.append(name.removeprefix(MODEL))
                        break
    return nonzero


def _reference_model(meta: CheckpointMeta, cfg: Config, dtype: torch.dtype | None) -> torch.nn.Module:
    """The checkpoint's model in float32, its weights rounded to the exported dtype (what the export holds; the
    routers of Glm4Moe and DeepseekV3 exports stay in float32, Mixtral's are rounded too)."""
    from pretrain.checkpoint import load_checkpoint

    model = cfg.model.build()
    load_checkpoint(meta.path, model, restore_rng_state=False)
    if dtype is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if not name.endswith(mixtral_names.KEPT_DTYPE if _is_mixtral(cfg.model) else moe_names.KEPT_DTYPE):
                    param.copy_(param.to(dtype).float())
    return model


def export_hf(checkpoint: Path, out_dir: Path, dtype: torch.dtype | None = None, max_shard_bytes: int | None = None,
              tokenizer: Path | None = None, verify: bool = False, mtp: str = "keep") -> dict[str, Any]:
    """Writes the checkpoint as a LlamaForCausalLM folder `out_dir` (Glm4MoeForCausalLM for a GQA + sigmoid MoE
    model, MixtralForCausalLM for a GQA + softmax one, DeepseekV3ForCausalLM for MLA + MoE) and returns its
    conversion record.
    `dtype`: of the written weights (None: as stored); `tokenizer`: instead of the one the checkpoint recorded (it
    must be the same file); `verify`: load the result with transformers and compare logits (recorded); `mtp`: "keep"
    writes the MoE model's MTP modules in DeepSeek-V3's layout (Glm4Moe and DeepseekV3), "drop" leaves them out."""
    from pretrain.generate_cli import tokenizer_file

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if mtp not in ("keep", "drop"):
        raise ConversionError(f"--mtp {mtp}: keep or drop")
    meta, cfg = _source_meta(checkpoint)
    stored = _check_stored(meta, cfg.model)
    kept_mtp = cfg.model.mtp_depth if mtp == "keep" else 0
    mixtral = _is_mixtral(cfg.model)
    if mixtral and kept_mtp:
        raise ConversionError(f"{meta.path}: cannot export multi-token prediction modules (model.mtp_depth: "
                              f"{kept_mtp}) to {mixtral_config.ARCHITECTURE}, which has no MTP layers: pass --mtp drop "
                              "to leave them out")
    if mixtral and (biased := _nonzero_selection_biases(meta)):
        raise ConversionError(f"{meta.path}: cannot export nonzero expert selection biases ({biased[:4]}; "
                              f"auxiliary-loss-free balancing, model.moe.bias_update_rate: "
                              f"{cfg.model.moe.bias_update_rate}) to {mixtral_config.ARCHITECTURE}, which selects "
                              "experts by the softmax scores alone")
    if mtp == "drop":
        stored = {name: value for name, value in stored.items() if not name.startswith("mtp.")}
    layout = mtp_names.MTPLayout(cfg.model.n_layers, kept_mtp, cfg.model.tie_embeddings)
    tokenizer_json = tokenizer_file(meta.path, None if tokenizer is None else str(tokenizer))
    ids = special_ids(tokenizer_json)
    if ids["vocab_size"] > cfg.model.vocab_size:
        raise ConversionError(f"{tokenizer_json} has {ids['vocab_size']} tokens, more than the model's vocabulary "
                              f"({cfg.model.vocab_size})")
    weights_dtype = dtype or stored["embed.weight"][1]
    moe, mla = cfg.model.moe.enabled, cfg.model.attention == "mla"
    # Glm4Moe's RoPE is Llama's on whole heads, DeepseekV3's Llama's on the rope part (checked at that size)
    rope_model = replace(cfg.model, d_model=cfg.model.n_heads * cfg.model.rope_dim) if mla else cfg.model
    config = to_llama_config(rope_model, str(weights_dtype).removeprefix("torch."), ids[BOS], ids[EOS], ids[PAD])
    rope_check = check_rope_with_transformers(rope_model, config)
    if mla:
        config = deepseek_v3_config.to_deepseek_v3_config(cfg.model, config["dtype"], ids[BOS], ids[EOS], ids[PAD],
                                                          kept_mtp)
    elif mixtral:
        config = mixtral_config.to_mixtral_config(cfg.model, config["dtype"], ids[BOS], ids[EOS], ids[PAD])
    elif moe:
        config = glm4_moe_config.to_glm4_moe_config(cfg.model, config["dtype"], ids[BOS], ids[EOS], ids[PAD],
                                                    kept_mtp)
    with atomic_folder(out_dir) as work:
        if mixtral:
            entries = [entry for name, (shape, kept) in sorted(stored.items())
                       for entry in mixtral_names.hf_entries(name, shape, kept, dtype)]
            tensors = (pair for name, tensor in iter_full_tensors(meta.path) if name in stored
                       for pair in mixtral_names.hf_tensors(name, tensor, dtype))
        elif moe:
            entries = [entry for name, (shape, kept) in sorted(stored.items())
                       for entry in layout.hf_entries(name, shape, kept, dtype)]
            tensors = (pair for name, tensor in iter_full_tensors(meta.path) if name in stored for pair in
                       layout.hf_tensors(name, mla_rope.to_interleaved(name, tensor, cfg.model.mla) if mla else tensor,
                                         dtype))
        else:
            entries = [(to_hf(name), dtype or kept, shape) for name, (shape, kept) in sorted(stored.items())]
            tensors = ((to_hf(name), tensor) for name, tensor in iter_full_tensors(meta.path, dtype=dtype))
        files = write_safetensors(work, "model", entries, tensors, max_shard_bytes)
        write_tokenizer_files(tokenizer_json, work, config["max_position_embeddings"])
        _dump(work / "config.json", config)
        _dump(work / "generation_config.json", generation_config(ids))
        names = {ours: theirs for ours, theirs in mapping_table().items()
                 if ours != "lm_head.weight" or not cfg.model.tie_embeddings}
        if mixtral:
            names = mixtral_names.mapping_table(cfg.model.tie_embeddings)
        elif moe:
            names = moe_names.mapping_table(cfg.model.tie_embeddings, mla) | (mtp_names.mapping_table() if kept_mtp
                                                                              else {})
        architecture, model_type = config["architectures"][0], config["model_type"]
        record = {
            "source": {"checkpoint": str(meta.path.resolve()), "step": meta.step, "model": asdict(cfg.model)},
            "target": {"architecture": architecture, "model_type": model_type, "files": [f.name for f in files],
                       "dtype": config["dtype"], "tensors": len(entries)},
            "name_mapping": names,
            "rope": {"ours": asdict(cfg.model.rope), "rope_parameters": config["rope_parameters"],
                     "max_position_embeddings": config["max_position_embeddings"],
                     "layout": "ours rotate-half, written interleaved (rope_interleave: true): the rope rows of the "
                               "query and kv_a_proj_with_mqa permuted, as DeepSeek's checkpoints" if mla else
                               "rotate-half on both sides: q_proj and k_proj rows are copied unpermuted",
                     "check": rope_check},
            "tie_word_embeddings": cfg.model.tie_embeddings,
            **({"routing": (mixtral_config if mixtral else glm4_moe_config).routing_mapping(cfg.model)}
               if moe else {}),
            **({"mtp": {"depth": cfg.model.mtp_depth, "written": kept_mtp,
                        "note": "written as model.layers.{n_layers + k} in DeepSeek-V3's layout, with "
                                "num_nextn_predict_layers and tie_last_hidden_states: false (transformers' "
                                "generate(use_mtp=True) drafts with them)" if kept_mtp else "left out (--mtp drop)"}}
                if cfg.model.mtp_depth else {}),
            "vocab_size": cfg.model.vocab_size,
            "tokenizer": {"source": str(tokenizer_json), "sha256": tokenizer_sha256(tokenizer_json),
                          "vocab_size": ids["vocab_size"]},
        }
        if verify:
            from tools.hf.parity import measure_parity

            length = min(config["max_position_embeddings"], 128)
            record["parity"] = measure_parity(_reference_model(meta, cfg, dtype), work, cfg.model.vocab_size, length)
        _dump(work / "conversion.json", record)
    return record


def _tensors_of(stored: dict[str, StoredTensor], model: ModelConfig, where: Path,
                stacked: dict[str, torch.Tensor] | None = None, left_over: list[str] | None = None,
                rename=None, names=moe_names) -> dict[str, StoredTensor | torch.Tensor]:
    """The folder's tensors under our names, exactly those of `model` (`stacked`: tensors already under our names,
    the MoE experts stacked; `left_over`: per-expert tensors beyond the config's experts; `rename`: of a mapped name,
    e.g. an MTP layer's block; `names`: the MoE naming, moe_names or mixtral_names)."""
    rename = rename or (lambda name: name)
    ours: dict[str, StoredTensor | torch.Tensor] = {rename(name): t for name, t in (stacked or {}).items()}
    unknown = list(left_over or [])
    for name, tensor in stored.items():
        if name.endswith("rotary_emb.inv_freq"):  # computed, not learned: older transformers saved it
            continue
        our_name = from_hf(name) or names.from_hf(name)
        our_name = our_name and rename(our_name)
        if our_name is None or not tensor.dtype.is_floating_point:
            unknown.append(f"{name} ({str(tensor.dtype).removeprefix('torch.')})")
            continue
        ours[our_name] = tensor
    mapped = MappedFiles()
    if model.tie_embeddings and "lm_head.weight" in ours and "embed.weight" in ours:
        head, embed = ours.pop("lm_head.weight"), ours["embed.weight"]
        if not torch.equal(mapped.tensor(head), mapped.tensor(embed)):
            raise ConversionError(f"{where}: tie_word_embeddings is true, but lm_head.weight differs from "
                                  "model.embed_tokens.weight")
    wanted = _model_shapes(model)
    their = names.their_name
    missing = [their(name) for name in sorted(set(wanted) - set(ours))]
    unexpected = unknown + [their(name) for name in sorted(set(ours) - set(wanted))]
    reshaped = [f"{their(k)} {list(ours[k].shape)} (config.json: {list(wanted[k])})" for k in sorted(wanted)
                if k in ours and tuple(ours[k].shape) != wanted[k]]
    if missing or unexpected or reshaped:
        problems = [f"{label} {items[:6]}" for label, items in
                    (("missing", missing), ("unexpected", unexpected), ("reshaped", reshaped)) if items]
        raise ConversionError(f"{where}'s weights do not fit its config.json: {'; '.join(problems)}")
    return ours


def import_hf(hf_dir: Path, out_checkpoint: Path) -> Path:
    """Writes the LlamaForCausalLM, Glm4MoeForCausalLM, MixtralForCausalLM or DeepseekV3ForCausalLM folder `hf_dir`
    as an ordinary
    checkpoint folder `out_checkpoint` (weights in the dtype they are stored in) and returns it."""
    hf_dir, out = Path(hf_dir), Path(out_checkpoint)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{hf_dir} has no config.json: pass a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{config_path} is not valid JSON: {exc}") from None
    architecture = (config.get("architectures") or [ARCHITECTURE])[0]
    from_config = {glm4_moe_config.ARCHITECTURE: glm4_moe_config.from_glm4_moe_config,
                   mixtral_config.ARCHITECTURE: mixtral_config.from_mixtral_config,
                   deepseek_v3_config.ARCHITECTURE: deepseek_v3_config.from_deepseek_v3_config}
    model = from_config.get(architecture, from_llama_config)(config, str(config_path))
    moe = model.moe.enabled
    names = mixtral_names if architecture == mixtral_config.ARCHITECTURE else moe_names
    supported = model.rope.max_supported_seq_len(model.max_seq_len)
    cfg = Config(model=model, data=DataConfig(seq_len=min(DataConfig().seq_len, supported)))
    try:
        validate(cfg, check_paths=False)
    except ConfigError as exc:
        raise ConversionError(f"{config_path} is not representable by our model: {exc}") from None
    folder, stacked, left_over = read_folder(hf_dir), {}, []
    # MTP layers after the main ones in DeepSeek-V3's layout (tools/hf/mtp_names.py) become our MTP modules
    depth = int(config.get("num_nextn_predict_layers", config.get("num_mtp_layers")) or 0) if moe else 0
    depth = 0 if names is mixtral_names else depth
    depth = depth if any(name.startswith(f"model.layers.{model.n_layers}.") for name in folder) else 0
    mapped = MappedFiles()
    mtp_own, copies, folder = mtp_names.split_mtp_layers(folder, model.n_layers, depth, mapped.tensor)
    if depth:
        model = replace(model, mtp_depth=depth)
        cfg.model = model
        main = {"embed_tokens.weight": "model.embed_tokens.weight",
                "shared_head.head.weight": "model.embed_tokens.weight" if model.tie_embeddings else "lm_head.weight"}
        for name, copy in copies.items():
            source = main[name.split(".", 3)[3]]
            if source not in folder or not torch.equal(mapped.tensor(copy), mapped.tensor(folder[source])):
                raise ConversionError(f"{hf_dir}: {name} differs from {source} (our MTP modules share the main "
                                      "model's embedding and head)")
    if moe:  # their per-expert linears, stacked (memory-mapped views in, one stacked tensor per weight out)
        experts = {name: tensor for name, tensor in folder.items() if names.is_expert(name)}
        folder = {name: tensor for name, tensor in folder.items() if name not in experts}
        views = MappedFiles()
        stacked, left_over = names.stack_experts({name: views.tensor(t) for name, t in experts.items()},
                                                 model.moe.num_experts, hf_dir)
        if names is mixtral_names:  # Mixtral selects by the scores alone: our selection biases are zero
            stacked |= mixtral_names.selection_biases(model.n_layers, model.moe.num_experts)
    stored = _tensors_of(folder, model, hf_dir, stacked | mtp_own, left_over, mtp_names.block_name(model.n_layers),
                         names)
    tokenizer = hf_dir / "tokenizer.json"
    state: dict[str, Any] = {"imported_from": {"path": str(hf_dir.resolve()), "architecture": architecture}}
    if depth:
        state["imported_from"]["mtp_layers"] = depth
    if tokenizer.is_file():
        state["tokenizer"] = {"path": str(out.resolve() / "tokenizer.json"), "sha256": tokenizer_sha256(tokenizer)}
    interleaved = model.attention == "mla" and config.get("rope_interleave", True)  # DeepseekV3's default

    def streamed() -> Iterator[tuple[str, torch.Tensor]]:
        """Each tensor only when it is written: a view of the mapped files, or experts stacked."""
        for name, value in sorted(stored.items()):
            tensor = value.make() if isinstance(value, LazyTensor) else (
                value if isinstance(value, torch.Tensor) else mapped.tensor(value))
            yield MODEL + name, mla_rope.from_interleaved(name, tensor, model.mla) if interleaved else tensor

    entries = [(MODEL + name, value.dtype, tuple(value.shape)) for name, value in sorted(stored.items())]
    with atomic_folder(out, inner=step_dir_name(IMPORT_STEP)) as work:
        written = CheckpointManager(work, keep_last=1).save_streamed(
            IMPORT_STEP, entries, streamed(), state, config_to_yaml(cfg), layout={"world_size": 1})
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, written / "tokenizer.json")
    return out
