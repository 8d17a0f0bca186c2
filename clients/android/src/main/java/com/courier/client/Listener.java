package com.courier.client;

/** What the app hears from the client. Every call comes on the client's own thread, in order. */
public interface Listener {
    /**
     * Processes one event (durably: write its effects and the seq in one transaction).
     * The client acks it only after this returns; if it throws, the event is not acked and
     * the connection is restarted, so that the event comes again.
     */
    void onEvent(CourierEvent event) throws Exception;

    /**
     * The server's stream does not continue where the app's state is: events were deleted
     * by retention before this device got them ({@code hello.truncated}), or the stream ends
     * below the app's last seq (the server lost or reset its ledger; the client then resumes
     * from the server's newest seq). Resync the app's state from your backend; events keep
     * coming after this call.
     */
    default void onResyncNeeded(String reason) {}

    /** The connection state changed. */
    default void onState(CourierClient.State state) {}

    /**
     * The client stopped for good and will not reconnect by itself: replaced by another
     * connection of this device (4009), evicted (4010), or refused (bad token, 400, 403).
     * Call {@link CourierClient#connect()} again on a user action or the next foreground.
     */
    default void onStopped(String reason) {}
}
