"""Original (remote-code) InternVL checkpoints <-> transformers-native `InternVLForConditionalGeneration`.

Original checkpoints (`model_type: internvl_chat`, class `InternVLChatModel`) ship their own Python code.
This package never runs it: it reads `config.json` and the safetensors files as data, and maps them with
its own tables. Every problem a user can fix is raised as `CheckpointError`, naming the file.

- `config`: read and check original configs, the LLM families, the one JSON reader.
- `config_map`: original config <-> `InternVLConfig`, `<IMG_CONTEXT>`'s id, the -hf processor config.
- `keymap`: the key rule table, qkv split/fuse, state-dict conversion in both directions.
- `safetensors`: safetensors headers, a folder's weight files, reading tensors, dtype names.
- `load`: `load_original_model` (an original folder -> the native model, shard by shard).
- `tokenizer`: `load_original_tokenizer` (InternLM2's sentencepiece tokenizer rebuilt).
- `save`: `save_original`, `convert_checkpoint`, atomic output folders.
- `adapter`: PEFT LoRA adapters: `read_adapter` (merging) and `convert_adapter` (layout remapping).
"""
