# Sourced by the GPU scripts, which run from the working tree without `pip install`: the package installs
# kernels/ and reference/ as nanomoe_kernels and nanomoe_reference (pyproject.toml), so put those names on
# PYTHONPATH as links to the folders.
_nm_names=/tmp/nanomoe_names
mkdir -p "$_nm_names"
ln -sfn "$PWD/kernels" "$_nm_names/nanomoe_kernels"
ln -sfn "$PWD/reference" "$_nm_names/nanomoe_reference"
export PYTHONPATH="$_nm_names:$PWD${PYTHONPATH:+:$PYTHONPATH}"
