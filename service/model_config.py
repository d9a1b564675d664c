"""A version's effective configuration, in the JSON form of Triton's ModelConfig.

`tritonclient.get_model_config` and `perf_analyzer` read `max_batch_size` and the inputs' `dims`
(which leave out the batch dimension when `max_batch_size` > 0, as in Triton). Fields Triton
lacks sit under `runtime` (the providers ONNX Runtime actually uses, with their options) and
`foldserve` (labels, effective preprocessing, warm-up).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from service.preprocess import effective_spec
from service.repository import ModelConfig
from service.runtime import ModelVersion, RuntimeOptions, TensorSpec
from service.settings import Settings


def _tensor(spec: TensorSpec, batched: bool) -> dict[str, Any]:
    dims = list(spec.shape[1:] if batched else spec.shape)
    return {"name": spec.name, "data_type": spec.datatype.triton_config, "dims": dims}


def effective_config(
    model: ModelVersion, config: ModelConfig, settings: Settings, options: RuntimeOptions
) -> dict[str, Any]:
    max_batch = config.max_batch_size
    if max_batch is None:
        max_batch = settings.max_batch_size
    batched = model.batched and max_batch > 0
    on_gpu = any(
        p in model.providers for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    )
    result: dict[str, Any] = {
        "name": model.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "version_policy": config.version_policy.describe(),
        "max_batch_size": max_batch if batched else 0,
        "input": [_tensor(s, batched) for s in model.inputs],
        "output": [_tensor(s, batched) for s in model.outputs],
        "instance_group": [
            {
                "name": f"{model.name}_0",
                "kind": "KIND_GPU" if on_gpu else "KIND_CPU",
                "count": 1,
                "gpus": [options.device_id] if on_gpu else [],
            }
        ],
        "parameters": {
            "intra_op_thread_count": {"string_value": str(options.intra_op_threads)},
            "inter_op_thread_count": {"string_value": str(options.inter_op_threads)},
        },
        "runtime": {
            "providers": model.providers,
            "provider_options": model.provider_options,
            "requested_providers": list(options.providers),
            "inline": model.inline,
            "warmup_us": round(model.warmup_us, 1),
        },
    }
    if model.batching.enabled:  # the policy the batcher enforces, set from this same config
        result["dynamic_batching"] = {
            "max_queue_delay_microseconds": model.batching.max_queue_delay_us,
            "default_queue_policy": {"max_queue_size": model.batching.max_queue_size},
        }
    if model.metadata is not None:
        spec = effective_spec(model.metadata.input, config.preprocessing)
        result["foldserve"] = {
            "labels": list(model.metadata.labels),
            "preprocessing": dataclasses.asdict(spec),
            "output": dataclasses.asdict(model.metadata.output),
        }
    return result
