"""The BatchNorm family: the layers a model trains with and the statistics it infers with.

* `reference`   — BatchNorm from its equations: forward and hand-written backward as functions,
                  and `ReferenceBatchNorm1d/2d`, drop-ins for `nn.BatchNorm1d/2d`;
* `sync`        — `SyncBatchNorm`: training normalises over every process's batch (gloo, NCCL);
* `population`  — the `--bn-stats` policies: which average of the batch statistics inference
                  uses (EMA, a window of the last N batches, the cumulative average);
* `recalibrate` — `--bn-recalibrate`: the population statistics recomputed in one pass;
* `layers`      — finding a model's BatchNorms, and the one guard against using them in
                  training mode where running statistics are meant.

docs/batchnorm.md derives what these modules compute.
"""
