# Sourced (from the repository root) by the pretrain_gpt_*.sh launchers: sets CONFIG and SAVE to their
# defaults and builds ARGS, the trainer flags every launcher passes, from the environment knobs CONFIG,
# SAVE, TP, PP, DATA_PATH, TOKENIZER_TYPE, TOKENIZER_MODEL, VOCAB_SIZE and DS_CONFIG.
CONFIG=${CONFIG:-examples/gpt_1b.yaml}
SAVE=${SAVE:-runs/$(basename "$CONFIG" .yaml)}

ARGS=(--config "$CONFIG" --tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}"
      --save "$SAVE" --load "$SAVE" --tensorboard-dir "$SAVE/tensorboard" --metrics-jsonl "$SAVE/metrics.jsonl")
if [ -n "${DATA_PATH:-}" ]; then
    # shellcheck disable=SC2206  # DATA_PATH may be a blend: "0.7 A 0.3 B"
    ARGS+=(--data-path $DATA_PATH --tokenizer-type "${TOKENIZER_TYPE:-SentencePieceTokenizer}"
           --tokenizer-model "${TOKENIZER_MODEL:?set TOKENIZER_MODEL with DATA_PATH}")
else
    ARGS+=(--mock-data --vocab-size "${VOCAB_SIZE:-32000}")
fi
if [ -n "${DS_CONFIG:-}" ]; then
    ARGS+=(--deepspeed-config "$DS_CONFIG")
fi
