//! The peer network's tasks belong to the fetcher that started them: once it is dropped,
//! the listener stops accepting.

use std::time::{Duration, Instant};

use shoal_config::Config;
use shoal_fetcher::Fetcher;

#[tokio::test]
async fn the_peer_listener_ends_with_its_fetcher() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::parse(&format!(
        "root = \"{}\"\n[peers]\nlisten = \"127.0.0.1:0\"\nstatic = [\"127.0.0.1:7420\"]\n",
        dir.path().display()
    ))
    .unwrap();
    let fetcher = Fetcher::new(&config).unwrap();
    let bound = fetcher
        .start_peers()
        .await
        .unwrap()
        .expect("peers are configured");
    tokio::net::TcpStream::connect(bound)
        .await
        .expect("the listener accepts while its fetcher lives");

    drop(fetcher);
    // An aborted task is dropped at its next await, on a runtime thread: bounded wait.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if tokio::net::TcpStream::connect(bound).await.is_err() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the peer listener still accepts 5 s after its fetcher was dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
