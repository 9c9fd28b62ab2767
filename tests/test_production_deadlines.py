"""Deadlines reach every registered handler: a multi-pass method stops at the next check.

The servicer turns the gRPC deadline and cancellation into a RequestState (tested end
to end in test_production_overload.py); here each handler in the registry runs through
the transport-free Core with a state that expires after its second check, so a handler
that runs many passes without checking fails by name.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from saliency_service.core.errors import DeadlineExceeded, ServiceError
from saliency_service.core.repository import Repository
from saliency_service.core.request import CostCounter, RequestState
from saliency_service.methods import registry
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.codec import Core, method_enum
from saliency_service.serving.metrics import Metrics
from tests.conftest import make_config
from tests.production_support import tiny_request

registry.load_builtin()
HANDLERS = registry.handlers()


class ExpiringState(RequestState):
    """Counts checks; past ``expire_after`` of them the deadline has passed."""

    def __init__(self, expire_after: int | None = None) -> None:
        super().__init__(None)
        self.checks = 0
        self.expire_after = expire_after

    def check(self) -> None:
        self.checks += 1
        if self.expire_after is not None and self.checks > self.expire_after:
            raise DeadlineExceeded("the request's deadline passed (test)")


@pytest.fixture(scope="module")
def core(repository: Path) -> Core:
    models = Repository(repository)
    models.load_all()
    # A small memory budget: a few network inputs per chunk, so checks come between passes.
    per_item = int(models.get("tiny").spec().extra.get("activation_bytes", 0)) or 2**16
    return Core(models, make_config(repository, chunk_memory_bytes=8 * per_item), Metrics())


@pytest.mark.parametrize("handler", HANDLERS, ids=[h.name for h in HANDLERS])
def test_deadline_stops_every_multi_pass_method(core: Core, handler) -> None:
    handle = core.repository.get("tiny")
    if not handler.available_for(handle):
        pytest.skip(f"{handler.name} is not offered for the test model")
    batch = 1
    request = tiny_request(method_enum(handler.name), batch=batch)
    full_state, full_cost = ExpiringState(), CostCounter()
    try:
        core.explain(request, full_state, full_cost)
    except ServiceError as error:
        pytest.skip(f"{handler.name} refuses the default request: {error}")
    assert full_state.checks >= 1, f"{handler.name} never checks the deadline"
    if full_cost.forward_passes <= 2 * batch:
        return  # about one pass per image: nothing to interrupt
    cut_state, cut_cost = ExpiringState(expire_after=2), CostCounter()
    with pytest.raises(DeadlineExceeded):
        core.explain(request, cut_state, cut_cost)
    assert cut_cost.forward_passes < full_cost.forward_passes, (
        f"{handler.name} ran {cut_cost.forward_passes} of {full_cost.forward_passes} "
        "forward passes after its deadline"
    )
    assert cut_state.checks == 3


def test_the_registry_offers_long_methods(core: Core) -> None:
    """The parametrization above is not vacuous: some registered method runs many passes."""
    request = tiny_request(pb.METHOD_OCCLUSION, batch=2)
    cost = CostCounter()
    core.explain(request, ExpiringState(), cost)
    assert cost.forward_passes > 4
