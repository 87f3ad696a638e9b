//! Redis connection management: one multiplexed, auto-reconnecting connection per process.

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use std::time::Duration;

/// Connects to Redis and checks the connection with a PING.
pub async fn connect(url: &str) -> anyhow::Result<ConnectionManager> {
    let redacted = crate::config::redact_url(url);
    let client = redis::Client::open(url)
        .map_err(|e| anyhow::anyhow!("invalid REDIS_URL {redacted}: {e}"))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    let mut conn = ConnectionManager::new_with_config(client, config)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to Redis at {redacted}: {e}"))?;
    ping(&mut conn)
        .await
        .map_err(|e| anyhow::anyhow!("Redis at {redacted} does not answer PING: {e}"))?;
    Ok(conn)
}

/// PING, for readiness checks.
pub async fn ping(conn: &mut ConnectionManager) -> redis::RedisResult<()> {
    redis::cmd("PING")
        .query_async::<String>(conn)
        .await
        .map(|_| ())
}

/// Deletes `keys`, 500 to a command (a replay may delete hundreds of thousands; one `DEL`
/// with all of them would block Redis for as long).
pub async fn delete_keys(conn: &mut ConnectionManager, keys: &[String]) -> redis::RedisResult<()> {
    for chunk in keys.chunks(500) {
        redis::cmd("DEL").arg(chunk).query_async::<()>(conn).await?;
    }
    Ok(())
}

/// Every key matching `pattern`, by `SCAN` (never `KEYS`, which blocks Redis while it walks
/// every key): for replays, which delete what a projection wrote.
pub async fn scan_keys<C: ConnectionLike>(
    redis: &mut C,
    pattern: &str,
) -> redis::RedisResult<Vec<String>> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(redis)
            .await?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}
