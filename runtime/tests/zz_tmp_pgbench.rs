#![allow(clippy::unwrap_used, missing_docs)]
use retrace_runtime::store::NewInstance;
use retrace_runtime::{PostgresOptions, PostgresStore, Store};
use std::sync::Arc;
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tmp_bench() {
    let url = "postgres://postgres@127.0.0.1:5432/test";
    let s = Arc::new(
        PostgresStore::connect_with(
            url,
            PostgresOptions::default().with_schema("retrace_tmpbench"),
        )
        .await
        .unwrap(),
    );
    let t = std::time::Instant::now();
    for i in 0..300 {
        s.create_instance(NewInstance {
            id: format!("x{i}-{}", uuid::Uuid::new_v4()),
            coordinator: "c".into(),
            input: serde_json::json!(1),
            parent: None,
        })
        .await
        .unwrap();
    }
    eprintln!("300 sequential creates: {:?}", t.elapsed());
    let t = std::time::Instant::now();
    for _ in 0..300 {
        s.describe("x").await.unwrap();
    }
    eprintln!("300 describes: {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let futs = (0..300).map(|i| {
        let s = s.clone();
        async move {
            s.create_instance(NewInstance {
                id: format!("y{i}-{}", uuid::Uuid::new_v4()),
                coordinator: "c".into(),
                input: serde_json::json!(1),
                parent: None,
            })
            .await
            .unwrap();
        }
    });
    futures::future::join_all(futs).await;
    eprintln!("300 concurrent creates: {:?}", t.elapsed());
}
