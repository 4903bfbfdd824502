#!/usr/bin/env bash
# Per-augmentation ablation of the classifier (generalisation to other sites' radiographs), run in
# the background: nohup research/augment-ablation.sh > runs/ablation.log 2>&1 &
# Measured, not shipped. The default classifier recipe (mobilenet.yaml, same seed) with each
# robust group left out (finetune.augment_skip), and with the light augmentation instead; each evaluated on val (served pipeline, no test-time
# views, yolov8n detector: the classifier columns only) under the shifts it should matter for.
# Every step resumes / skips when its output exists.
cd "$(dirname "$0")/.."  # the repository root
PY=.venv/bin/python
OUT=runs/ablation; mkdir -p $OUT
evaluate() {  # name models_dir shift
  local rep=$OUT/eval-$1-$3
  [ -f $rep/scores.csv ] && return
  $PY -m training evaluate --split val --models-dir $2 --classifier classifier-mobilenetv2${1#ref} \
    --detector detector-yolov8n --shift $3 --report $rep > $rep.log 2>&1
}
modeldir() {  # name export_dir -> a folder with models/ and the run's files
  local d=$OUT/models-$1; rm -rf $d; mkdir -p $d
  for f in models/*; do ln -sf "$(pwd)/$f" $d/; done
  for f in $2/*; do ln -sf "$(pwd)/$f" $d/; done
  echo $d
}
# Every run, the reference included, is the 1.x default recipe (classifier-mobilenetv2 1.0.0:
# +-20 degree turns, epochs chosen without test-time views, no fusion), pinned over the current
# mobilenet.yaml so that a new machine retrains the same reference.
BASE=(--set finetune.rotate_degrees=20 --set finetune.tta=none)
[ -f runs/classifier-mobilenetv2/export/classifier-mobilenetv2.onnx ] || $PY -m training mobilenet \
  --config training/configs/mobilenet.yaml "${BASE[@]}" \
  --out runs/classifier-mobilenetv2/export > $OUT/train-ref.log 2>&1
ref=$(modeldir ref runs/classifier-mobilenetv2/export)
arm() {  # suffix overrides... ; then shifts after --
  local suffix=$1; shift
  local sets=(); while [ "$1" != "--" ]; do sets+=(--set "$1"); shift; done; shift
  local name=classifier-mobilenetv2$suffix
  [ -f runs/$name/export/$name.onnx ] || $PY -m training mobilenet \
    --config training/configs/mobilenet.yaml --set name=$name "${BASE[@]}" "${sets[@]}" \
    --out runs/$name/export > $OUT/train$suffix.log 2>&1
  local d=$(modeldir $suffix runs/$name/export)
  # the reference under a shift only when an arm needs it, so the first arms finish sooner
  for s in "$@"; do evaluate ref $ref $s; evaluate $suffix $d $s; done
}
# Arms not yet measured on any machine first: each new machine restarts from the reference.
arm -skip-resolution "finetune.augment_skip=[resolution]" -- none lowres all
arm -skip-jpeg "finetune.augment_skip=[jpeg]" -- none jpeg all
arm -skip-intensity "finetune.augment_skip=[intensity]" -- none contrast all
arm -skip-blur-noise "finetune.augment_skip=[blur,noise]" -- none lowres all
arm -skip-markers "finetune.augment_skip=[markers]" -- none markers all
arm -light finetune.augment=light -- none lowres contrast jpeg markers all
