import os

import pytest
import torch

# Tests are small; more threads than cores only adds noise on the 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def quadratic():
    """f(theta) = 1/2 theta^T A theta + b^T theta in float64, with its exact gradient."""
    from helpers import QuadraticOracle

    gen = torch.Generator().manual_seed(0)
    d = 12
    m = torch.randn(d, d, generator=gen, dtype=torch.float64)
    a = m @ m.T / d + torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    return QuadraticOracle(a, b)


@pytest.fixture(scope="session")
def tiny_defense(tmp_path_factory):
    """(stages, overrides, root): the tiny certified-defense pipeline's stages 1-2, built once per session."""
    for module in ("onnxruntime", "onnx", "onnxscript"):
        pytest.importorskip(module, reason=f"needs the onnx extra ({module} missing): pip install 'blackbox-zo[onnx]'")
    from serve_helpers import TINY

    from blackbox_zo.config import resolve_config
    from problems.certified_defense import CertifiedDefenseConfig, CertifiedDefenseProblem, prepare_stages

    root = tmp_path_factory.mktemp("tiny-defense")
    overrides = TINY + [f"run.out_dir={root / 'runs'}", f"defense.artifacts_dir={root / 'stages'}"]
    config = resolve_config(CertifiedDefenseConfig, CertifiedDefenseProblem().default_config(), None, overrides)
    stages = prepare_stages(config, log=lambda *_: None)
    return stages, overrides, root


@pytest.fixture(scope="session")
def served(tiny_defense):
    """(server, stages, overrides, root): the tiny pipeline's classifier behind MLServer."""
    from serve_helpers import FAULTY, SECRET, need_serve_extra, server_env

    need_serve_extra()
    from oracles.serving import OipServer, ServedModel

    stages, overrides, root = tiny_defense
    onnx = stages.classifier_onnx
    models = [ServedModel("digits", onnx),
              ServedModel("slow", onnx, implementation=FAULTY, extra={"fault": "slow", "delay_s": 2.0}),
              ServedModel("bad-shape", onnx, implementation=FAULTY, extra={"fault": "bad_shape"}),
              ServedModel("nan", onnx, implementation=FAULTY, extra={"fault": "nan"}),
              ServedModel("flaky", onnx, implementation=FAULTY, extra={"fault": "flaky", "retry_after": "0.3"}),
              ServedModel("auth", onnx, implementation=FAULTY, extra={"fault": "auth", "token": SECRET})]
    with OipServer(models, root / "repo", env=server_env()) as server:
        yield server, stages, overrides, root
