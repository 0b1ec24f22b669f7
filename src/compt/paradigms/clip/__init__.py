"""The CLIP paradigm (open_clip models, multi-caption contrastive loss, image-caption data)."""
