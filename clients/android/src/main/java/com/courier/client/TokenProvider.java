package com.courier.client;

/**
 * Supplies the device token (a JWT minted by the app's backend). The client calls
 * {@link #token()} for each connection and {@link #refresh()} when the token is about to
 * expire, has expired (close code 4001, HTTP 401 token_expired) or was refused.
 * Both are called on the client's own thread, never on the main thread; refresh may
 * block on a network call to the backend.
 */
public interface TokenProvider {
    /** The current token. */
    String token();

    /** Fetches a new token from the backend and returns it (it becomes the current one). */
    String refresh() throws Exception;
}
