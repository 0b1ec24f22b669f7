"""Fine-tuning a CLIP member for classification (issue 16): the pieces, each in its own module.

- ``sets``: the labelled fine-tuning set generated from the embedded scenes; ImageFolder train/test pairs
- ``probe``: the CLIP paper's linear probe (frozen features, logistic regression, C on a validation split)
- ``head``: the image tower plus a zero-shot-initialized linear head, at any patch-grid resolution
- ``sid``: AutoProg-Zero's stage identifier, added to the class token
- ``unfreeze``: AutoProg-Zero's block groups, stage plans and fresh AdamW moments
- ``proxies`` / ``search``: the zero-cost proxies and the per-stage schedule search
"""
