"""The simulated service manager used by the scale benchmark."""

from __future__ import annotations

import json

from fleetkit.testing.simruntime import SimulatedRuntime


async def test_simulated_units_start_and_stop(tmp_path):
    journal = tmp_path / "active.jsonl"
    runtime = SimulatedRuntime(str(journal))
    await runtime.connect()

    await runtime.install({"a.service": ("[Service]\n", "h1")})
    results = await runtime.start(["a.service"])
    active = await runtime.statuses(["a.service"])
    await runtime.stop(["a.service"])
    stopped = await runtime.statuses(["a.service"])
    installed = await runtime.installed_units()
    await runtime.close()

    assert results == {"a.service": "done"}
    assert active["a.service"].active_state == "active"
    assert stopped["a.service"].active_state == "inactive"
    assert installed == {"a.service": "h1"}
    assert json.loads(journal.read_text().splitlines()[0])["unit"] == "a.service"
