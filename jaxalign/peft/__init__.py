"""Parameter-efficient fine-tuning: LoRA adapters (`lora.py`), an NF4 double-quantised frozen base (`nf4.py`, QLoRA)
and Hugging Face PEFT adapter files (`peft_io.py`). Every stage gets them through `lora.*` config keys and the shared
state init in `stages/model_init.py`.

Why not qwix (0.1.8, evaluated before writing this; measured on this model, CPU, flax 0.12.8):
- `qwix.apply_lora_to_model(Transformer, LoraProvider(module_path=".*", rank=4, alpha=8, weight_qtype="nf4"), tokens)`
  fails on both forms of our model: with unrolled layers "TraceContextError: Cannot mutate 'MLP' from different trace
  level" (our blocks run as `nnx.merge(graphdef, state)` inside `jax.checkpoint`/jit, where qwix creates its LoRA
  params lazily during the first call); with `scan_layers` an IndexError (the stacked weights inside `lax.scan`).
  qwix intercepts `dot_general`/`einsum` of flax `Linear`/`Einsum` modules and finds the weight by identity among
  the module's params; our projections are `x @ w[...]` on bare `nnx.Param`s, used functionally.
- Its NF4 (`qwix/_src/core/numerics.py`) has the same 16 values, but quantises by an argmin over the 16 values per
  element (a 16x temporary), stores one code per `jnp.uint4` element, and has no double quantisation of the scales
  (fp32 per-tile scales: 4.5 bits per parameter at tile 64, against 4.127 here).
- Dropout uses `nnx.Dropout(deterministic=False)` with module RNG streams, which our functional (graphdef, params)
  training step does not carry.
So jaxalign implements LoRA, NF4 and dropout itself on the model's own projections (`lora.dense`), keeping param paths
and logical axes that the mesh rules, checkpoints and HF mappings already understand.
"""
