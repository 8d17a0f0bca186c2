from __future__ import annotations

from tests.harness import Device, ServerProcess, unique


async def test_publish_reaches_connected_device(server: ServerProcess) -> None:
    user = unique()
    phone = await Device.connect(server, user, "phone1")
    result = await server.publish(user, data={"block_id": "B9"}, id=unique("grab"))
    event = await phone.event()
    assert event["seq"] == result["seq"]
    assert event["data"] == {"block_id": "B9"}
    await phone.close()
