from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from prunepilot.compression import (
    UnknownArchitectureError,
    WeightsError,
    architectures,
    build_model,
    count_macs,
    count_params,
    load_model,
    read_state_dict,
)

# Published figures (He et al. 2016; conv + linear multiply-accumulates).
PUBLISHED = {"resnet20": (41e6, 0.27e6), "resnet56": (125e6, 0.85e6)}


@pytest.mark.parametrize("arch", ["resnet20", "resnet56"])
def test_cifar_resnet_costs_match_published(arch: str, shared_dir: Path) -> None:
    model = load_model(arch, shared_dir / f"{arch}-cifar10.th")
    macs, params = PUBLISHED[arch]
    assert count_macs(model, 32) == pytest.approx(macs, rel=0.02)
    assert count_params(model) == pytest.approx(params, rel=0.02)


def test_every_zoo_architecture_builds() -> None:
    names = {a.name for a in architectures()}
    assert {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18", "resnet50", "mobilenet_v2",
            "mobilenet_v3_small", "vgg16_bn"} <= names
    model = build_model("resnet110")
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_unknown_architecture_is_a_clear_error() -> None:
    with pytest.raises(UnknownArchitectureError, match="unknown architecture 'resnet21'.*resnet20"):
        build_model("resnet21")


def test_mismatched_weights_name_the_keys(resnet56_weights: Path) -> None:
    with pytest.raises(WeightsError, match=r"unexpected keys: layer1\.3\.conv1\.weight"):
        load_model("resnet20", resnet56_weights)
    with pytest.raises(WeightsError, match="missing keys: layer1.3"):
        sd = read_state_dict(resnet56_weights)
        sd = {k: v for k, v in sd.items() if not k.startswith("layer1.3.")}
        from prunepilot.compression import load_weights

        load_weights(build_model("resnet56"), sd)


def test_safetensors_round_trip(tmp_path: Path, resnet20) -> None:
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in resnet20.state_dict().items()}, str(path))
    again = load_model("resnet20", path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again(x), resnet20(x))


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {_Evil.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _Evil.marker = marker
    path = tmp_path / "evil.pt"
    with path.open("wb") as fh:
        pickle.dump({"state_dict": {"w": _Evil()}}, fh)
    with pytest.raises(WeightsError, match="not a state dict"):
        read_state_dict(path)
    assert not marker.exists()


def test_garbage_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"definitely not weights")
    with pytest.raises(WeightsError):
        read_state_dict(path)
    with pytest.raises(WeightsError, match="not found"):
        read_state_dict(tmp_path / "absent.pt")
