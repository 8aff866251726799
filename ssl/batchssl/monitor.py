"""The live kNN monitor: the frozen backbone's kNN top-1 / top-5 on the validation split during training, computed
by the same functions as `python -m knn_eval` (the bank is the labelled training split)."""

from __future__ import annotations

import time
from functools import cached_property

from batchssl.config import Config
from batchssl.data import DatasetInfo


class KnnMonitor:
    def __init__(self, cfg: Config, info: DatasetInfo):
        from batchssl.eval.frozen import eval_splits

        self.bank, self.val = eval_splits(cfg, info)
        self.cfg, self.num_classes = cfg, info.num_classes

    @cached_property
    def class_counts(self) -> list[int] | None:
        """Images per class in the pretraining split (for many / medium / few); read once, on the main process."""
        from batchssl.data import pretrain_class_counts

        return pretrain_class_counts(self.cfg.data)

    def __call__(self, backbone, accelerator, dtype, online=None) -> dict:
        """kNN metrics (main process), and with `online` (an OnlineLinear) its top-1 / top-5 on the same
        validation features: no second pass over the data."""
        # FAISS loads only when monitoring.
        from batchssl.eval.knn import KnnSettings, split_features
        from batchssl.eval.per_class import knn_frequency_metrics

        start = time.perf_counter()
        m = self.cfg.monitor
        settings = KnnSettings(
            ks=(m.k,), temperature=m.temperature, batch_size=m.batch_size, num_workers=self.cfg.data.num_workers
        )
        features = split_features(backbone, self.bank, self.val, settings, accelerator, dtype)
        result = {}
        if accelerator.is_main_process:
            # knn_top1 / top5 / k as knn_evaluate, plus knn_many / medium / few and knn_class_std (one search)
            result = knn_frequency_metrics(features, settings, self.num_classes, self.class_counts)
            if online is not None:
                result.update(online.evaluate(features.queries, features.query_labels))
        result["knn_seconds"] = time.perf_counter() - start
        return result
