# The tiny pretraining data and the 4-step run of tests/pretrain, for the conversion tests (session-scoped there).
from tests.pretrain.conftest import base_run, tiny_data  # noqa: F401
