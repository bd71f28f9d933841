"""The trainer with NaN gradients injected (a test's fault injection; the loss stays finite):
`python tests/nan_gradient.py FIRST LAST TRAIN_FLAGS...` runs pipeline.train, multiplying the word
embeddings' gradient by NaN in every micro batch of optimizer steps FIRST..LAST (1-based)."""
import sys

import pipeline.train as train

first, last = int(sys.argv[1]), int(sys.argv[2])
make_engine = train.make_engine


def make_engine_with_nan(model, s, ds_cfg, device, **kw):
    gas, calls = ds_cfg["gradient_accumulation_steps"], [0]

    def hook(grad):
        calls[0] += 1
        step = (calls[0] - 1) // gas + 1  # an fp32 run skips no step before the first NaN
        return grad * float("nan") if first <= step <= last else grad

    model.bert.embeddings.word_embeddings.weight.register_hook(hook)
    return make_engine(model, s, ds_cfg, device, **kw)


train.make_engine = make_engine_with_nan
sys.exit(train.main(sys.argv[3:]))
