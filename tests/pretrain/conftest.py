import socket

import pytest

from tests.conftest import BASE_RUN, TINY_MODEL  # noqa: F401  (the fixtures live in tests/conftest.py)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SFT = ["data.format=chat", "data.document_masking=true", "data.restart_positions=true", "model.max_seq_len=128",
       "data.seq_len=128"]


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory, tiny_data):
    """Chat data from real text (fortunes split into question and reply) over tiny_data's tokenizer."""
    from tests.data.conftest import write_fortune_chat_folder

    return write_fortune_chat_folder(tmp_path_factory.mktemp("tiny_chat"), tiny_data / "tokenizer.json")


DPO = ["data.format=preference", "data.document_masking=true", "data.restart_positions=true",
       "model.max_seq_len=256", "data.seq_len=256", "data.skip_invalid_records=true", "dpo.beta=0.5"]


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory, tiny_data):
    """Preference pairs from the packaged Bible (a verse chosen, its neighbour rejected) over tiny_data's tokenizer."""
    from data.preference_prepare import prepare_preference_dataset

    out = tmp_path_factory.mktemp("tiny_pairs")
    prepare_preference_dataset(out, ["bible"], tiny_data / "tokenizer.json", val_fraction=0.1, max_per_source=300)
    return out
