#!/usr/bin/env bash
# Rebuild the shipped code models and their drafters from scratch (CPU, offline):
# corpus + tokenizer from this Python's stdlib, the two targets, four drafters each, then copy
# the final fp16 weights into src/nimblelm/assets/. Every step resumes from its checkpoint
# when rerun after an interruption. The figures in docs/shipped_models.md came from this.
set -euo pipefail
cd "$(dirname "$0")/.."
NL=${NL:-.venv/bin/nimblelm}
THREADS=${THREADS:-1}

[ -f data/code/train.bin ] || $NL train corpus --out data/code

common="--data data/code --batch-size 16 --seq-len 256 --lr 3e-3 --min-lr 3e-4 --warmup 30 --eval-batches 4
        --checkpoint-every 20 --threads $THREADS --weight-dtype float16"
# no --steps: one epoch of the train split (1817 steps of 16 x 256 tokens; 80-90 min each on one thread)
$NL train lm --preset code-attn   --out runs/code-attn   --eval-every 200 $common &
$NL train lm --preset code-hybrid --out runs/code-hybrid --eval-every 200 $common &
wait

drafter() {  # target kind steps seq_len [extra options]
  $NL train drafter --target "runs/$1" --kind "$2" --data data/code --out "runs/$1/drafters/$2" --steps "$3" \
      --batch-size 8 --seq-len "$4" --lr 3e-3 --min-lr 3e-4 --warmup 10 --eval-every 0 --eval-batches 4 \
      --checkpoint-every 20 --threads "$THREADS" --weight-dtype float16 "${@:5}"
}
for target in code-attn code-hybrid; do
  drafter $target eagle  800 256 --draft-vocab 2048 &  # + draft_vocab.safetensors (FR-Spec subset)
  { drafter $target medusa 400 128; drafter $target hydra 400 128; drafter $target sps 300 256; } &
  wait
done

for target in code-attn code-hybrid; do
  dest=src/nimblelm/assets/nimble-$target
  rm -rf "$dest" && mkdir -p "$dest"
  cp runs/$target/{config.json,model.safetensors,tokenizer.json} data/code/prompts.json "$dest/"
  for kind in eagle medusa hydra sps; do
    mkdir -p "$dest/drafters/$kind"
    cp runs/$target/drafters/$kind/*.json runs/$target/drafters/$kind/*.safetensors "$dest/drafters/$kind/"
  done
  rm -f "$dest"/drafters/*/train_log.jsonl
done
du -sh src/nimblelm/assets/*
