#!/usr/bin/env bash
# The data both context-extension experiments read (scripts/run_long_context.sh, scripts/run_passkey_extension.sh):
# the packaged corpora (data_cache/tiny, whose tokenizer the others share) and their long documents
# (data_cache/tiny_long). Needs the installed .venv; prepares only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
[ -f data_cache/tiny/manifest.json ] || pretrain data prepare --out data_cache/tiny --vocab-size 4096
[ -f data_cache/tiny_long/manifest.json ] || pretrain data prepare --out data_cache/tiny_long \
  --source bible-books --source anarchism-chapters --source shakespeare-plays \
  --tokenizer data_cache/tiny/tokenizer.json --val-fraction 0.05
