package com.courier.client;

/** What the app hears from the client. Every call comes on the client's own thread, in order. */
public interface Listener {
    /**
     * Processes one event (durably: write its effects and the seq in one transaction).
     * The client acks it only after this returns; if it throws, the event is not acked and
     * the connection is restarted, so that the event comes again.
     */
    void onEvent(CourierEvent event) throws Exception;

    /** The connection state changed. */
    default void onState(CourierClient.State state) {}

    /**
     * The client stopped for good and will not reconnect by itself: replaced by another
     * connection of this device (4009), evicted (4010), or refused (bad token, 400, 403).
     * Call {@link CourierClient#connect()} again on a user action or the next foreground.
     */
    default void onStopped(String reason) {}
}
