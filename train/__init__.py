"""Training stage: dataset -> fine-tuned adapter folder (PEFT format)."""
