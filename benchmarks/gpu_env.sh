# Source this on the GPU machine (bash, repo root): makes `import optforge` work without `pip install -e .`,
# which fails there. Installs the carried wheels (.whl/: pydantic and friends, gguf) to /tmp/site and links
# the package dirs (optforge.passes, .evals, .runtime live in passes/, evals/, runtime/) into optforge/, as
# pyproject's package-dir mapping does for an install (.gitignore lists the links).
#   source benchmarks/gpu_env.sh
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
fi
for d in passes evals runtime; do [ -e "optforge/$d" ] || ln -s "../$d" "optforge/$d"; done
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import optforge.runtime, torch; print('optforge from', optforge.__file__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
