"""MTP modules exported in DeepSeek-V3's layout (tools/hf/mtp_names.py) checked through transformers' own MTP
speculative decoding (`generate(use_mtp=True)`: `MTPCandidateGenerator` builds `transformers.modeling_layers.MtpModel`
from the exported folder), for Glm4MoeForCausalLM (GQA + MoE) and DeepseekV3ForCausalLM (MLA + MoE), offline, fp32,
with every RMSNorm weight random (with ones, a norm applied twice or skipped hardly shows): transformers' depth-1
draft logits equal our MTP module's, `generate(use_mtp=True)` drafts our MTP module's tokens and gives plain greedy
decoding's tokens, which are ours.

Found on the way (transformers 5.24):
- `MtpModel.from_pretrained` finds MTP weights only at the layer indices of the published checkpoints
  (`_keys_to_ignore_on_load_unexpected`: `model.layers.61` for DeepseekV3, 46 and 92 for Glm4Moe): for other depths
  it raises "weights are missing". The tests point that class attribute at our layers on the loaded instance
  (`ready_for_mtp`), which is all a user of such an export has to do.
- transformers hands MTP depth 1 `hidden_states[-1]`, by default the main model's output after its final norm; ours
  takes the last block's output before it. The export writes `tie_last_hidden_states: false`, which makes
  `hidden_states[-1]` that pre-norm output (without it depth 1's logits move by ~1).
- depth k + 1 of transformers' MtpModel takes depth k's output after `shared_head.norm` (its `post_norm`), ours takes
  it before (as it takes the main model's): depths >= 2 differ from ours, and no config.json setting changes that
  (`test_depth_two_differs_by_the_norm_of_the_chained_state` pins the difference exactly). Drafts stay drafts:
  speculative decoding's output is the main model's whatever they are.
"""

import json
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import model_tensors
from pretrain.decoding import generate_batch
from tests.tools.test_convert_hf import ours, safetensors_of
from tests.tools.test_convert_hf_moe import mla_model, moe_model, save_moe_checkpoint
from tools.convert_hf import export_hf, import_hf
from tools.hf.parity import load_transformers_model

MTP_TOLERANCE = 1e-5  # fp32 rounding is ~2e-6 on logits of ~3.5; a wrong norm, order or projection moves them by ~1
ARCHITECTURES = {"glm4-moe": (moe_model, "Glm4MoeForCausalLM"), "deepseek-v3": (mla_model, "DeepseekV3ForCausalLM")}


def mtp_checkpoint(root: Path, tokenizer: Path, arch: str, depth: int = 1) -> Path:
    return save_moe_checkpoint(root / "run", ARCHITECTURES[arch][0](mtp_depth=depth), tokenizer, random_norms=True)


def ready_for_mtp(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' MtpModel looks for the MTP layers' weights with the main model's
    `_keys_to_ignore_on_load_unexpected`, whose layer indices are those of the published checkpoints: point them at
    the folder's MTP layers."""
    config = model.config
    model._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{config.num_hidden_layers + k}\..*"
                                                for k in range(config.num_mtp_layers)]
    return model


def their_mtp(folder: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the main model, transformers' MtpModel of it), built as MTPCandidateGenerator builds it."""
    from transformers.modeling_layers import MtpModel

    theirs = ready_for_mtp(load_transformers_model(folder))
    return theirs, MtpModel.from_pretrained(theirs, device_map={"": torch.device("cpu")}).eval()


@torch.no_grad()
def our_mtp_logits(model: torch.nn.Module, ids: torch.Tensor, normed_chain: bool = False) -> list[torch.Tensor]:
    """Each depth's logits, ours: depth k at position i (of the main model's ids[:, :-depth]) sees token
    ids[:, i + k]. `normed_chain`: hand depth k + 1 depth k's output after its norm (what transformers does)."""
    depth, seq = len(model.mtp), ids.shape[1] - len(model.mtp)
    cos, sin, _ = model.attention_inputs(seq)
    hidden = model.forward_layers(model.embed(ids[:, :seq]), model.layers, seq)
    logits = []
    for k, module in enumerate(model.mtp, start=1):
        hidden = module(hidden, model.embed(ids[:, k: seq + k]), cos, sin)
        logits.append(model.lm_head(module.norm(hidden)))
        hidden = module.norm(hidden) if normed_chain else hidden
    assert len(logits) == depth
    return logits


@torch.no_grad()
def their_mtp_logits(theirs, mtp, ids: torch.Tensor, tied_last_hidden: bool = False) -> list[torch.Tensor]:
    """Each depth's logits from transformers' MtpModel, fed as MTPCandidateGenerator feeds it after the prefill: the
    main model's `hidden_states[-1]` (`tied_last_hidden`: its normed `last_hidden_state`, transformers' default),
    the ids shifted by one, positions from 1, an MtpCache."""
    from transformers.cache_utils import MtpCache

    depth = len(mtp.layers)
    seq = ids.shape[1] - depth
    out = theirs(input_ids=ids[:, :seq], output_hidden_states=-1)
    hidden = theirs.model(input_ids=ids[:, :seq]).last_hidden_state if tied_last_hidden else out.hidden_states[-1]
    positions, cache = torch.arange(1, seq + 1)[None].expand(ids.shape[0], -1), MtpCache(config=mtp.config)
    logits = []
    for k in range(depth):
        hidden = mtp.forward_layer(k, hidden, positions + k, cache, input_ids=ids[:, k + 1: seq + k + 1])
        logits.append(mtp._project_to_logits(hidden))
    return logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def mtp_export(request, tiny_data, tmp_path_factory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = mtp_checkpoint(root, tiny_data / "tokenizer.json", request.param)
    export_hf(checkpoint, root / "hf", verify=True)
    return request.param, checkpoint, root / "hf"


@torch.no_grad()
def test_transformers_mtp_model_drafts_our_mtp_logits(mtp_export):
    arch, checkpoint, folder = mtp_export
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[arch][1]]
    assert config["num_nextn_predict_layers"] == 1 and config["tie_last_hidden_states"] is False
    theirs, mtp = their_mtp(folder)
    assert theirs.config.num_mtp_layers == 1 and len(mtp.layers) == 1
    model = ours(checkpoint)
    ids = torch.randint(0, 512, (2, 49), generator=torch.Generator().manual_seed(11))
    (expected,), (got,) = our_mtp_logits(model, ids), their_mtp_logits(theirs, mtp, ids)
    diff = max_diff(got, expected)
    # MtpModel.forward: the draft of the last position, as generate(use_mtp=True) calls it
    from transformers.cache_utils import MtpCache

    hidden = theirs(input_ids=ids[:, :48], output_hidden_states=-1).hidden_states[-1]
    drafted, draft_logits, _ = mtp(input_ids=ids[:, 1:], last_hidden_states=hidden, attention_mask=None,
                                   position_ids=torch.arange(1, 49)[None].expand(2, -1),
                                   mtp_cache=MtpCache(config=mtp.config))
    draft_diff = max_diff(draft_logits[:, 0], expected[:, -1])
    print(f"{arch}: transformers' MtpModel depth-1 logits vs our MTP module, 2 x 48 positions: max abs diff "
          f"{diff:.1e} (largest logit {float(expected.abs().max()):.2f}); MtpModel.forward's draft: {draft_diff:.1e}")
    assert diff < MTP_TOLERANCE and draft_diff < MTP_TOLERANCE
    assert torch.equal(drafted[:, 0], expected[:, -1].argmax(-1))
    # the export's flag is what makes depth 1 ours: with transformers' default (the normed last_hidden_state) it is not
    (untied,) = their_mtp_logits(theirs, mtp, ids, tied_last_hidden=True)
    print(f"{arch}: fed the final norm's output (tie_last_hidden_states unset): {max_diff(untied, expected):.2f}")
    assert max_diff(untied, expected) > 0.1


@torch.no_grad()
def test_generate_with_mtp_drafts_our_tokens_and_gives_our_greedy_tokens(mtp_export, monkeypatch):
    """generate(use_mtp=True) = plain greedy generate = ours, and every token transformers' MtpModel drafted on the
    way is our MTP module's argmax for that sequence."""
    from transformers.modeling_layers import MtpModel

    arch, checkpoint, folder = mtp_export
    drafts = []
    forward = MtpModel.forward

    def recording(self, *args, **kwargs):
        result = forward(self, *args, **kwargs)
        drafts.append((kwargs["full_input_ids"].clone(), result[0].clone()))
        return result

    monkeypatch.setattr(MtpModel, "forward", recording)
    theirs, model = ready_for_mtp(load_transformers_model(folder)), ours(checkpoint)
    stops = set(json.loads((folder / "generation_config.json").read_text())["eos_token_id"])
    prompts = torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(12))
    for prompt in prompts:
        ids = prompt[None]
        mask = torch.ones_like(ids)
        plain = theirs.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)[0, 9:].tolist()
        drafts.clear()
        with_mtp = theirs.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                   use_mtp=True)[0, 9:].tolist()
        (mine,) = generate_batch(model, [prompt.tolist()], 12, stop_ids=stops)
        print(f"{arch}: greedy {mine}, generate(use_mtp=True) {with_mtp} after {len(drafts)} MTP drafts")
        assert with_mtp == plain and plain[: len(mine)] == mine and len(plain) - len(mine) in (0, 1)
        assert len(mine) >= 8 and len(drafts) >= 4
        for sequence, drafted in drafts:
            (expected,) = our_mtp_logits(model, sequence)  # the draft for the position after it
            assert drafted.tolist() == [[int(expected[0, -1].argmax())]], (sequence, drafted)


@torch.no_grad()
def test_depth_two_differs_by_the_norm_of_the_chained_state(tiny_data, tmp_path):
    """Depth 1 is ours; transformers' depth 2 is ours fed depth 1's normed output (shared_head.norm) instead of its
    output: exactly that, and not ours."""
    checkpoint = mtp_checkpoint(tmp_path, tiny_data / "tokenizer.json", "glm4-moe", depth=2)
    export_hf(checkpoint, tmp_path / "hf")
    theirs, mtp = their_mtp(tmp_path / "hf")
    model = ours(checkpoint)
    ids = torch.randint(0, 512, (2, 42), generator=torch.Generator().manual_seed(13))
    got, expected = their_mtp_logits(theirs, mtp, ids), our_mtp_logits(model, ids)
    normed = our_mtp_logits(model, ids, normed_chain=True)
    print(f"depth 2: depth-1 logits {max_diff(got[0], expected[0]):.1e}; depth 2 vs ours "
          f"{max_diff(got[1], expected[1]):.2f}, vs ours with the chained state normed "
          f"{max_diff(got[1], normed[1]):.1e}")
    assert max_diff(got[0], expected[0]) < MTP_TOLERANCE and max_diff(got[1], normed[1]) < MTP_TOLERANCE
    assert max_diff(got[1], expected[1]) > 0.1


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_our_mtp_export_imports_with_its_mtp_modules_and_exports_back_bit_identical(arch, tiny_data, tmp_path):
    from pretrain.checkpoint import read_meta

    checkpoint = mtp_checkpoint(tmp_path, tiny_data / "tokenizer.json", arch)
    export_hf(checkpoint, tmp_path / "hf")
    imported = import_hf(tmp_path / "hf", tmp_path / "imported")
    assert read_meta(imported).state["imported_from"]["mtp_layers"] == 1
    original, back = model_tensors(ours(checkpoint)), model_tensors(ours(imported))
    assert any(name.startswith("mtp.0.") for name in back)
    assert sorted(original) == sorted(back) and all(torch.equal(original[k], back[k]) for k in original)
    export_hf(imported, tmp_path / "again")
    first, again = safetensors_of(tmp_path / "hf"), safetensors_of(tmp_path / "again")
    assert any(name.startswith("model.layers.3.") for name in first)
    assert sorted(first) == sorted(again) and all(torch.equal(first[k], again[k]) for k in first)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["num_nextn_predict_layers"] == 1
