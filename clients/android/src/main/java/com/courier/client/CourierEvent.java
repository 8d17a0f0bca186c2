package com.courier.client;

import org.json.JSONObject;

/** One event of the user's stream, as the {@code event} frame carries it. */
public final class CourierEvent {
    public final long seq;
    public final String id;
    public final String kind;
    public final JSONObject data;
    public final String createdAt;
    /** ISO-8601 UTC, or null: it never expires. */
    public final String expiresAt;
    /** The target device, or null for an event meant for all the user's devices. */
    public final String device;
    /** The collapse key, or null. A keyed event is a snapshot: keep the newest of a key. */
    public final String collapse;

    CourierEvent(JSONObject frame) throws org.json.JSONException {
        seq = frame.getLong("seq");
        id = frame.getString("id");
        kind = frame.getString("kind");
        data = frame.optJSONObject("data") != null ? frame.getJSONObject("data") : new JSONObject();
        createdAt = frame.getString("created_at");
        expiresAt = nullable(frame, "expires_at");
        device = nullable(frame, "device");
        collapse = nullable(frame, "collapse");
    }

    private static String nullable(JSONObject frame, String name) {
        return frame.isNull(name) ? null : frame.optString(name, null);
    }

    @Override
    public String toString() {
        return "CourierEvent{seq=" + seq + ", id=" + id + ", kind=" + kind + "}";
    }
}
