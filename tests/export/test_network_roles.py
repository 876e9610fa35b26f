"""export/specs.NETWORK_ROLES is the one place that says which editor runs which network, which are denoisers,
optional and compiled (issue 23): a role declared there is what the backends build, what export lists and
what a Triton pipeline model routes."""
import pytest

from editrt.export import specs
from editrt.export.components import resolve_components
from editrt.export.specs import NETWORK_ROLES, NetworkRole, editor_networks, network_specs
from editrt.export.triton import bls_routes
from editrt.models.components import WeightsLayout
from editrt.models.estimators import estimator_network_config
from editrt.runtime.backends import build_engines


def test_every_spec_has_a_role_and_every_role_a_spec(tiny_weights):
    layout = WeightsLayout(tiny_weights)
    built = network_specs({**layout.network_config(), **estimator_network_config(layout)})
    assert list(built) == list(NETWORK_ROLES)  # same names, and export order is the declaration order
    assert built["element_unet"].role.denoiser and built["matting"].role.optional


def test_an_undeclared_spec_is_refused(tiny_weights, monkeypatch):
    layout = WeightsLayout(tiny_weights)
    monkeypatch.delitem(NETWORK_ROLES, "content_encoder")
    with pytest.raises(AssertionError, match="content_encoder"):
        network_specs(layout.network_config())


def test_a_declared_role_is_what_backends_export_and_triton_list(tiny_weights, monkeypatch):
    # declare, in the one place, that the elements editor no longer runs SAM's grid decoder ...
    monkeypatch.setitem(NETWORK_ROLES, "sam_mask_decoder_grid", NetworkRole(("reposition",)))
    # ... and a network no editor has yet, exported on its own
    monkeypatch.setitem(NETWORK_ROLES, "future_net", NetworkRole(("elements",), optional=True))
    elements = build_engines("elements", tiny_weights)
    assert sorted(elements.engines) == sorted(editor_networks("elements", optional=False))
    assert "sam_mask_decoder_grid" not in elements.engines and "sam_image_encoder" in elements.engines
    assert "future_net" in resolve_components("all") and resolve_components(["future_net"]) == ["future_net"]
    engines = ["element_unet", "sam_mask_decoder_grid", "future_net", "inpaint_unet"]
    assert bls_routes("elements", engines) == ["element_unet"]
    assert bls_routes("reposition", engines) == ["inpaint_unet", "sam_mask_decoder_grid"]
    assert specs.denoisers("elements") == ("element_unet",)
