//! The production S3 object store against moto's real S3 API: conditional writes (the basis of
//! state publication and the run ledger), metadata, listing and keys that need encoding.

use std::collections::BTreeMap;

use bridge_shared::S3Uri;
use bridge_shared::object_store::{ObjectStore, PutCondition, S3Store, StoreError};
use bytes::Bytes;
use harness::moto::Moto;

#[tokio::test]
async fn s3_store_conditional_writes_metadata_and_odd_keys_work_against_moto() -> anyhow::Result<()>
{
    let moto = Moto::start(None).await?;
    moto.create_bucket("bridge-test").await?;
    let store = S3Store::new(moto.s3.clone());
    let uri = S3Uri::new("bridge-test", "state/r/head.json");

    let first = store
        .put(
            &uri,
            Bytes::from_static(b"1"),
            PutCondition::IfAbsent,
            BTreeMap::new(),
        )
        .await?;
    let again = store
        .put(
            &uri,
            Bytes::from_static(b"2"),
            PutCondition::IfAbsent,
            BTreeMap::new(),
        )
        .await;
    assert!(
        matches!(again, Err(StoreError::PreconditionFailed { .. })),
        "{again:?}"
    );

    let second = store
        .put(
            &uri,
            Bytes::from_static(b"2"),
            PutCondition::IfMatch(first.etag.clone()),
            BTreeMap::new(),
        )
        .await?;
    let stale = store
        .put(
            &uri,
            Bytes::from_static(b"3"),
            PutCondition::IfMatch(first.etag),
            BTreeMap::new(),
        )
        .await;
    assert!(
        matches!(stale, Err(StoreError::PreconditionFailed { .. })),
        "{stale:?}"
    );
    assert_eq!(store.get(&uri).await?.1, Bytes::from_static(b"2"));
    assert_eq!(store.head(&uri).await?.map(|m| m.etag), Some(second.etag));

    let odd = S3Uri::new("bridge-test", "in/a b+c=é %.csv");
    let meta = BTreeMap::from([("bridge-force-full".to_string(), "true".to_string())]);
    store
        .put(&odd, Bytes::from_static(b"x"), PutCondition::None, meta)
        .await?;
    let head = store.head(&odd).await?.expect("exists");
    assert_eq!(
        head.metadata.get("bridge-force-full").map(String::as_str),
        Some("true")
    );
    let copy = S3Uri::new("bridge-test", "in/copy of a b+c.csv");
    store.copy(&odd, &copy).await?;
    let keys: Vec<String> = store
        .list("bridge-test", "in/")
        .await?
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(
        keys,
        vec![
            "in/a b+c=é %.csv".to_string(),
            "in/copy of a b+c.csv".to_string()
        ]
    );
    assert!(
        store
            .head(&S3Uri::new("bridge-test", "nope"))
            .await?
            .is_none()
    );
    assert!(matches!(
        store.get(&S3Uri::new("bridge-test", "nope")).await,
        Err(StoreError::NotFound { .. })
    ));

    // A suffix range: the last bytes only (a Parquet footer), all of a shorter object.
    let long = S3Uri::new("bridge-test", "tables/t/part-1.parquet");
    store
        .put(
            &long,
            Bytes::from_static(b"0123456789PAR1"),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await?;
    assert_eq!(store.get_tail(&long, 4).await?, Bytes::from_static(b"PAR1"));
    assert_eq!(
        store.get_tail(&long, 100).await?,
        Bytes::from_static(b"0123456789PAR1")
    );
    Ok(())
}
