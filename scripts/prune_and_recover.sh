#!/usr/bin/env bash
# Seed 002's three steps on the embedded corpus, as one command (a few CPU minutes):
#   1. dense model:  `slope train --dense` (a small Llama), exported as a Hugging Face folder
#   2. one-shot:     `slope oneshot` SparseGPT 2:4 (the seed's recipe + mask_structure "2:4")
#   3. recovery:     `slope finetune` with ConstantPruningModifier (every block linear) and SquareHead
#                    distillation (OutputDistillationModifier) from the dense model as the teacher
# then the validation loss of every stage on the held-out split (scripts/stage_losses.py).
# Outputs in OUT (default runs/prune_and_recover): 1-dense/, 2-oneshot-2of4/, 3-recovered/ (each a
# Hugging Face folder with its tokenizer), the recipes, summary.json.
#   bash scripts/prune_and_recover.sh [OUT]
# Knobs (environment): PRETRAIN_STEPS (300), CALIBRATION_SAMPLES (64), FT_STEPS (100), FT_LR (5e-4), SEED (0).
# `slope oneshot --dataset embedded` calibrates and `slope finetune` trains on the training split only.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/prune_and_recover}
VENV=$(bash scripts/setup_venv.sh)
SLOPE="$VENV/bin/python -m slope"
PRETRAIN_STEPS=${PRETRAIN_STEPS:-300}
SEED=${SEED:-0}
LAYERS=4
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "== 1/3 dense model: slope train --dense ($PRETRAIN_STEPS steps)"
$SLOPE train --dense --out "$OUT/dense-train" --seed "$SEED" --max-steps "$PRETRAIN_STEPS" --num-layers "$LAYERS" \
    --save-every 0 --eval-every "$PRETRAIN_STEPS"
rm -rf "$OUT/1-dense"
$SLOPE export "$OUT/dense-train" --output-dir "$OUT/1-dense" --form dense

echo "== 2/3 one-shot SparseGPT 2:4: slope oneshot"
cat > "$OUT/oneshot_recipe.yaml" <<'YAML'
pruning_stage:
  obcq_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      mask_structure: "2:4"
      block_size: 128
      sequential_update: False
      quantize: False
      targets: [
        "re:model.layers.\\d+$"
      ]
YAML
rm -rf "$OUT/2-oneshot-2of4"
$SLOPE oneshot --model "$OUT/1-dense" --dataset embedded --recipe "$OUT/oneshot_recipe.yaml" \
    --output-dir "$OUT/2-oneshot-2of4" --num-calibration-samples "${CALIBRATION_SAMPLES:-64}" --max-seq-len 128

echo "== 3/3 recovery with SquareHead from the dense teacher: slope finetune"
{
  cat <<'YAML'
recovery_stage:
  pruning_modifiers:
    ConstantPruningModifier:
      targets: ["re:.*self_attn.(q|k|v|o)_proj", "re:.*mlp.(gate|up|down)_proj"]
      start: 0
  distillation_modifiers:
    OutputDistillationModifier:
      targets: [
        "model.embed_tokens",
YAML
  for ((i = 0; i < LAYERS; i++)); do echo "        \"model.layers.$i\","; done
  cat <<'YAML'
        "model"
      ]
      comparison: "square_head"
      start: 0
      orig_scale: 1.0
      distill_scale: 1.0
YAML
} > "$OUT/recovery_recipe.yaml"
rm -rf "$OUT/3-recovered"
$SLOPE finetune --model "$OUT/2-oneshot-2of4" --dataset embedded --recipe "$OUT/recovery_recipe.yaml" \
    --distill-teacher "$OUT/1-dense" --output-dir "$OUT/3-recovered" --num-train-epochs 1 --max-steps "${FT_STEPS:-100}" \
    --learning-rate "${FT_LR:-5e-4}" --lr-scheduler-type linear --warmup-steps 10 --per-device-train-batch-size 16 \
    --max-seq-length 128 --bf16 False --gradient-checkpointing False --max-grad-norm None --seed "$SEED" \
    --logging-steps 10 --eval-batches 4

echo "== validation loss per stage"
"$VENV/bin/python" scripts/stage_losses.py --out "$OUT/summary.json" \
    "dense=$OUT/1-dense" "oneshot=$OUT/2-oneshot-2of4" "recovered=$OUT/3-recovered"
