"""Batched sampling, greedy and beam-search decoding (pretrain/decoding.py) and `pretrain generate`
(pretrain/generate_cli.py): left padding changes no prompt's tokens, top-k/top-p never sample outside their sets,
stops end a sequence and are removed, beam search scores like Hugging Face's."""

import argparse
import itertools
import json

import pytest
import torch

from pretrain.checkpoint import CheckpointError
from pretrain.config import ConfigError
from pretrain.decoding import SamplingOptions, beam_search, filter_logits, generate_batch
from pretrain.generate import greedy
from pretrain.generate_cli import add_generate_parser
from pretrain.model import ModelConfig, RopeConfig, Transformer
from pretrain.model.config import MLAConfig

VOCAB = 64
SHAPES = {
    "gqa": {},
    "sliding_window": {"sliding_window": 3},
    "dynamic_rope": {"rope": RopeConfig(scaling="dynamic", factor=4.0, original_max_seq_len=8)},
    "mla": {"attention": "mla", "mla": MLAConfig(q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8,
                                                  qk_rope_head_dim=8, v_head_dim=8)},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared machine spinning threads make them much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(**shape) -> Transformer:
    """Weights large enough that the next token depends on the whole context (at the default init_std a random
    model repeats its last token, which no masking or position error would change)."""
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                   max_seq_len=64, init_std=0.3, **shape)).eval()


def random_prompts(lengths=(9, 1, 4, 6)) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def alone(model: Transformer, prompt: list[int], new_tokens: int) -> list[int]:
    return greedy(model, torch.tensor([prompt]), new_tokens)[0][0, len(prompt):].tolist()


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_left_padded_batch_gives_each_prompt_its_own_greedy_tokens(shape):
    model, prompts = tiny_model(**shape), random_prompts()
    assert generate_batch(model, prompts, 16) == [alone(model, p, 16) for p in prompts]


def test_stop_ids_and_stop_sequences_end_a_sequence_and_are_removed():
    model, prompts = tiny_model(), random_prompts()
    wanted = [alone(model, p, 16) for p in prompts]
    stop = wanted[0][5]
    got = generate_batch(model, prompts, 16, stop_ids={stop})
    for tokens, full in zip(got, wanted, strict=True):  # rows stop at different steps; the others go on unchanged
        assert tokens == (full[: full.index(stop)] if stop in full else full)
    assert len(got[0]) <= 5
    sequence = wanted[2][3:5]
    got = generate_batch(model, prompts, 16, stop_sequences=[sequence, [VOCAB + 1]])
    for tokens, full in zip(got, wanted, strict=True):
        ends = [i for i in range(len(full) - 1) if full[i : i + 2] == sequence]
        assert tokens == (full[: ends[0]] if ends else full)
    assert len(got[2]) <= 3


def test_one_beam_is_greedy():
    model = tiny_model()
    for prompt in random_prompts():
        want = alone(model, prompt, 12)
        assert beam_search(model, prompt, 12, beams=1) == want
        assert beam_search(model, prompt, 12, beams=1, stop_ids={want[4]}) == want[: want.index(want[4])]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 3.0])
def test_beams_as_wide_as_the_vocabulary_find_the_best_two_token_hypothesis(length_penalty):
    """With as many beams as tokens, two steps are exhaustive: the answer must be the best of every one-token
    (stopped) and two-token hypothesis, scored sum_logprob / len**length_penalty with the stop token counted."""
    model, prompt = tiny_model(), random_prompts()[0]
    with torch.no_grad():
        first = model(torch.tensor([prompt]))[0, -1].log_softmax(-1)
        second = model(torch.tensor([[*prompt, t] for t in range(VOCAB)]))[:, -1].log_softmax(-1)
    stop = int(first.argmax())  # makes stopping at once a strong candidate that the length penalty can overturn
    hypotheses = {(stop,): float(first[stop])}
    hypotheses |= {(a, b): float(first[a] + second[a, b]) for a, b in itertools.product(range(VOCAB), repeat=2)
                   if a != stop}
    best = max(hypotheses, key=lambda h: hypotheses[h] / len(h) ** length_penalty)
    got = beam_search(model, prompt, 2, beams=VOCAB, length_penalty=length_penalty, stop_ids={stop})
    assert got == [t for t in best if t != stop]


def test_top_k_and_top_p_never_sample_outside_their_sets():
    logits = torch.randn(40, generator=torch.Generator().manual_seed(0)) * 2
    probs = logits.softmax(-1)
    g = torch.Generator().manual_seed(0)

    def draws(top_k=None, top_p=None) -> set[int]:
        return set(torch.multinomial(filter_logits(logits, top_k, top_p).softmax(-1), 20_000, replacement=True,
                                     generator=g).tolist())

    assert draws(top_k=5) == set(logits.topk(5).indices.tolist())
    order = probs.argsort(descending=True).tolist()
    mass = probs[order].cumsum(0)
    nucleus = set(order[: int((mass < 0.7).sum()) + 1])  # the smallest most-likely set reaching 0.7
    assert draws(top_p=0.7) == nucleus
    assert draws(top_k=5, top_p=0.7) <= nucleus & set(logits.topk(5).indices.tolist())
    assert draws(top_p=1e-6) == {order[0]}  # the most likely token always stays


@pytest.mark.parametrize(("top_k", "top_p"), [(3, None), (None, 0.5), (4, 0.6)])
def test_sampled_tokens_of_a_real_model_lie_in_their_sets(top_k, top_p):
    """Every sampled token, checked against the full (uncached) forward over its context: its rank under the
    temperature-scaled logits is below top_k and the probability of the tokens above it below top_p."""
    model, prompts, temperature = tiny_model(), random_prompts(), 1.5
    options = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
    for prompt, tokens in zip(prompts, generate_batch(model, prompts, 12, options), strict=True):
        assert len(tokens) == 12
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1] / temperature
        for step_logits, token in zip(logits, tokens, strict=True):
            above = step_logits > step_logits[token]
            if top_k is not None:
                assert int(above.sum()) < top_k
            if top_p is not None:
                assert float(step_logits.softmax(-1)[above].sum()) < top_p


def test_the_same_seed_gives_the_same_samples_whatever_the_batch():
    model, prompts = tiny_model(), random_prompts()
    options = SamplingOptions(temperature=2.0, seed=5)
    first = generate_batch(model, prompts, 16, options)
    assert generate_batch(model, prompts, 16, options) == first
    assert generate_batch(model, prompts, 16, SamplingOptions(temperature=2.0, seed=6)) != first
    assert generate_batch(model, prompts[2:], 16, SamplingOptions(temperature=2.0, seed=7)) == first[2:]


def generate_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_generate_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["generate", *argv])


def run_cli(capsys, *argv: str) -> tuple[str, str]:
    args = generate_args(*argv)
    assert args.func(args) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_cli_samples_greedy_beams_and_chat_end_to_end(base_run, tmp_path, capsys):
    from data.tokenizer import load_tokenizer
    from pretrain.generate_cli import tokenizer_file

    ckpt = str(base_run["checkpoint"])
    tokenizer = load_tokenizer(tokenizer_file(base_run["checkpoint"], None))
    out, err = run_cli(capsys, ckpt, "--prompt", "The fool", "--prompt", "A", "--max-new-tokens", "6", "--seed", "1",
                       "--top-k", "20", "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["prompt"] for line in lines] == ["The fool", "A"]
    assert all(len(line["tokens"]) <= 6 and line["completion"] == tokenizer.decode(line["tokens"]) for line in lines)
    assert "tokens/s" in err and "sampling" in err

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The fool\n\nA wise man\nLove\n")
    greedy_runs = [run_cli(capsys, ckpt, "--prompts-file", str(prompts), "--greedy", "--max-new-tokens", "5",
                           "--batch-size", size, "--json")[0] for size in ("1", "3")]
    assert greedy_runs[0] == greedy_runs[1] and len(greedy_runs[0].splitlines()) == 3

    out, err = run_cli(capsys, ckpt, "--prompt", "The fool", "--beams", "3", "--max-new-tokens", "4")
    assert out.startswith("### prompt\nThe fool\n### completion\n") and "beam search, 3 beams" in err

    full = json.loads(run_cli(capsys, ckpt, "--prompt", "The fool", "--max-new-tokens", "12", "--seed", "2",
                              "--json")[0])
    pieces = [tokenizer.decode([token]) for token in full["tokens"][3:]]
    stop = next(piece for piece in pieces if piece and "\ufffd" not in piece)  # a whole character or more
    cut = json.loads(run_cli(capsys, ckpt, "--prompt", "The fool", "--max-new-tokens", "12", "--seed", "2",
                             "--stop", stop, "--json")[0])
    assert cut["completion"] == full["completion"][: full["completion"].index(stop)]
    assert cut["completion"].startswith(tokenizer.decode(cut["tokens"]))

    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": "Who are you?"}) + "\n" + json.dumps(
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]}) + "\n")
    out, _ = run_cli(capsys, ckpt, "--chat", "--system", "Answer in rhyme.", "--prompts-file", str(chat),
                     "--max-new-tokens", "5", "--seed", "0", "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0]["prompt"] == "Who are you?" and lines[1]["prompt"][1]["content"] == "Hello"
    end_of_turn, eos = tokenizer.token_to_id("<|end_of_turn|>"), tokenizer.token_to_id("<|eos|>")
    assert all(not {end_of_turn, eos} & set(line["tokens"]) for line in lines)


def test_speculative_mode_stops_like_the_batched_one():
    from pretrain.generate_cli import completions
    from pretrain.generate_prompts import Prompt

    model, prompts = tiny_model(mtp_depth=2), random_prompts()
    wanted = [alone(model, p, 10) for p in prompts]
    stop = wanted[1][4]
    for mode in (["--speculative"], ["--greedy", "--batch-size", "3"]):
        args = generate_args("unused", "--max-new-tokens", "10", *mode)
        counts = {"drafted": 0, "accepted": 0}
        got = [tokens for _, tokens in completions(model, [Prompt("", p) for p in prompts], args, {stop}, [], 0,
                                                    counts)]
        assert got == [full[: full.index(stop)] if stop in full else full for full in wanted], mode
        assert (counts["drafted"] > 0) == (mode == ["--speculative"])


def test_cli_errors_name_the_problem(base_run, tmp_path, capsys):
    ckpt = str(base_run["checkpoint"])
    wrong = {
        ("--prompt", "x", "--beams", "2", "--temperature", "0.7"): "--beams",
        ("--prompt", "x", "--speculative", "--top-p", "0.9"): "--speculative",
        ("--prompt", "x", "--speculative"): "MTP",  # the tiny run has no MTP modules
        ("--prompt", " "): "empty",
        ("--prompt", "x", "--system", "hi"): "--chat",
        ("--prompt", "x", "--top-p", "0"): "--top-p",
    }
    for argv, message in wrong.items():
        args = generate_args(ckpt, *argv)
        with pytest.raises(ConfigError, match=message):
            args.func(args)
    args = generate_args(str(base_run["dir"]), "--prompt", "x")
    with pytest.raises(CheckpointError, match="no meta.json.*step_00000004"):
        args.func(args)
    args = generate_args(str(tmp_path), "--prompt", "x")
    with pytest.raises(CheckpointError, match="no meta.json"):
        args.func(args)
