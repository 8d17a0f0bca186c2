package com.courier.client;

/** A {@link SeqStore} in memory: for tests and tools, not for an app (lost on restart). */
public final class MemorySeqStore implements SeqStore {
    private volatile long seq;

    public MemorySeqStore() {
        this(-1);
    }

    public MemorySeqStore(long seq) {
        this.seq = seq;
    }

    @Override
    public long load() {
        return seq;
    }

    @Override
    public void save(long seq) {
        this.seq = seq;
    }
}
