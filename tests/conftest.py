import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist runs one worker per core: one intra-op thread each (children included), or the workers' OpenMP
# pools spin against each other and the suite runs about 3x slower on 2 cores
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (converted from the packaged GGUF once); shared by the slow tests, kept unpatched."""
    import hf_attn_zoo

    model, tokenizer = hf_attn_zoo.assets.load_default_model()
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def moh_checkpoint(tmp_path_factory):
    """A tiny Llama patched with a learned-router MoH on layer 1 (random router weights), saved: `(model, path)`."""
    import hf_attn_zoo
    from tests.matrix import randomize_new_parameters, tiny_model

    path = tmp_path_factory.mktemp("moh")
    model = hf_attn_zoo.patch(tiny_model("llama"), "moh", router="learned", layers=[1])
    randomize_new_parameters(model)
    model.save_pretrained(path)
    return model, path
