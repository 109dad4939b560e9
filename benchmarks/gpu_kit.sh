#!/usr/bin/env bash
# Wheels a lent GPU machine (Python 3.12, torch preinstalled, no network) lacks, in two kits:
#   .whl        everything `benchmarks/gpu.sh` needs: ../shared/gpu/make-kit.sh's slim Ray, ultralytics and
#               zarr, plus ome-zarr and its pydantic/dask stack (store.init_plates writes NGFF metadata)
#   .whl-train  the subset `research/gpu_train.sh` and `research/gpu_livecell.sh` need (ultralytics and its
#               thop/platform helpers, zarr, pycocotools for the folds' scores), small enough to travel with
#               the packed training data (research/pack_gpu_data.py, research/pack_livecell_gpu.py)
# Versions are pinned to the ones the project was tested with. Both folders belong in .git/info/exclude.
#   bash benchmarks/gpu_kit.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
grep -qx '/.whl-train/' .git/info/exclude 2>/dev/null || echo /.whl-train/ >> .git/info/exclude
bash ../shared/gpu/make-kit.sh .whl
# Replace make-kit's unpinned ultralytics/zarr/numcodecs with the tested versions.
rm -f .whl/ultralytics-[0-9]*.whl .whl/ultralytics_thop-*.whl .whl/ultralytics_platform-*.whl .whl/zarr-*.whl \
  .whl/numcodecs-*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  ultralytics==8.4.190 ultralytics-thop==2.2.3 ultralytics-platform==0.1.99 pycocotools==2.0.11 zarr==3.1.6 \
  numcodecs==0.17.1 ome-zarr==0.18.0 ome-zarr-models==1.7 pydantic==2.12.5 \
  pydantic_core==2.41.5 pydantic-zarr==0.9.2 annotated-types==0.8.0 typing-inspection==0.4.5 dask==2026.8.0 \
  Deprecated==1.3.1 importlib_metadata==10.2.0 partd==1.4.2 locket==1.0.0
rm -rf .whl-train && mkdir -p .whl-train
for w in ultralytics-8 ultralytics_thop ultralytics_platform pycocotools zarr numcodecs donfig google_crc32c; do
  ln -f .whl/$w*.whl .whl-train/
done
du -ch .whl/*.whl | tail -1
du -ch .whl-train/*.whl | tail -1
