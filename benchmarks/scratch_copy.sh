# Sourced by the benchmarks that time real stages (one_stage.sh, teacher_memo.sh): a scratch copy
# of HEAD under $TMPDIR, removed on exit, with this checkout's .venv first on PATH; the shell is
# left in it. Sets REPO (this checkout) and SCRATCH.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
git -C "$REPO" archive HEAD | tar -x -C "$SCRATCH"
cd "$SCRATCH"
ln -s "$REPO/.venv" .venv
export PATH=$PWD/.venv/bin:$PATH DVC_NO_ANALYTICS=1
