#!/usr/bin/env bash
# Fetch, on this machine, the wheels that the lent GPU machine lacks (its image has
# Python 3.12, torch, numpy, scipy, pillow, pyyaml; nothing can be downloaded there).
# They land in .whl/ (ignored by git); a device run carries it: see scripts/gpu-check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    monai==1.6.1 nibabel==5.4.2 pydicom==3.0.2 highdicom==0.28.2 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection==0.4.5 \
    pylibjpeg==2.1.0 pylibjpeg-openjpeg pylibjpeg-libjpeg typing-extensions \
    pytorch-ignite==0.5.5  # a bundle's own chain runs its SupervisedEvaluator
du -sh .whl
