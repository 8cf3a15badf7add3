"""Models: the MeanFlow UNet, its ControlNet, LoRA injection (peft), the joint model and saved-model formats."""
