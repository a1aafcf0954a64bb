#!/usr/bin/env bash
# The main job on the embedded default (EfficientNet-Lite0 + GeM, FAISS + SQLite index in a
# folder): install, index a folder of images, search it by image.
# Usage: bash scripts/demo.sh [IMAGE_FOLDER] [INDEX_FOLDER]
set -euo pipefail
cd "$(dirname "$0")/.."
images=${1:-../shared/datasets/gpr-mini/images}
db=${2:-.cbir}
bash scripts/setup.sh
n=$(find "$images" -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' \) | wc -l)
echo "demo: indexing $n images of $images into $db (about 7 images a second on two CPU cores;"
echo "      a second run describes only what changed). Give your own folder: bash scripts/demo.sh PHOTOS"
.venv/bin/cbir index "$images" --db "$db"
# sed reads to the end (head would close the pipe early: SIGPIPE, fatal under pipefail)
query=$(find "$images" -type f \( -iname '*.jpg' -o -iname '*.png' \) | sort | sed -n 1p)
echo "searching for the images most like $query"
.venv/bin/cbir search "$query" --db "$db" --k 10
.venv/bin/cbir stats --db "$db"
