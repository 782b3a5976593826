"""The retrain stage's parts: training sets (:mod:`.common`), the head on embeddings (:mod:`.head`),
fine-tuning the image tower (:mod:`.finetune`, with :mod:`.resume`) and which ``loss=`` fits which mode
(:mod:`.options`). :mod:`ssl_pipeline.stages.retrain` runs them as the stage."""
