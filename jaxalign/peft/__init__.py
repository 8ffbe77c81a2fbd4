"""Parameter-efficient fine-tuning: LoRA adapters (`lora.py`) and an NF4 double-quantised frozen base (`nf4.py`)."""
