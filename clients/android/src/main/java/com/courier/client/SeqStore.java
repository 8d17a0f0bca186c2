package com.courier.client;

/**
 * Where the app keeps the seq of the last event it has durably processed, e.g. a Room
 * table written in the same transaction as the event's effects. The client resumes from
 * it after every reconnect and drops any event at or below it.
 */
public interface SeqStore {
    /** The last processed seq, or -1 when the app has none (first start, data wiped). */
    long load();

    /** Records {@code seq} as processed. Called after {@link Listener#onEvent} returned. */
    void save(long seq);
}
