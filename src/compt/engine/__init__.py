"""The training engine, shared by every paradigm: one member's training loop (:mod:`~compt.engine.train`),
AdamW and schedules (:mod:`~compt.engine.optim`), checkpoints (:mod:`~compt.engine.checkpoint`), exact
resume (:mod:`~compt.engine.resume`), the run log (:mod:`~compt.engine.runlog`), torchrun/DDP
(:mod:`~compt.engine.dist`) and AutoProg-One's progressive training (:mod:`~compt.engine.progressive`,
``progressive_search``, ``progressive_cost``, ``progressive_train``). Nothing here imports a paradigm
by name."""
