//! One contract, every MemberStore: memory, and Redis on a real
//! redis-server and a real Redis Cluster spawned for the test.
use switchboard_presence::{BucketsError, MemberStore, MemoryMembers, RedisMembers, connect_redis};
use switchboard_protocol::{ChatId, UserId};
use switchboard_testkit::{RedisCluster, Server};

fn chat(s: &str) -> ChatId {
    ChatId::parse(s).unwrap()
}

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

async fn contract(store: &dyn MemberStore) {
    let (c1, c2) = (chat("c1"), chat("c2"));
    let (a, b) = (user("alice"), user("bob"));
    assert!(!store.is_member(&c1, &a).await.unwrap());
    assert_eq!(store.add(&c1, &[a.clone(), b.clone()]).await.unwrap(), 2);
    assert_eq!(
        store.add(&c1, std::slice::from_ref(&a)).await.unwrap(),
        0,
        "already a member"
    );
    store.add(&c2, std::slice::from_ref(&a)).await.unwrap();
    assert!(store.is_member(&c1, &a).await.unwrap());
    assert!(!store.is_member(&c2, &b).await.unwrap());
    assert_eq!(store.count(&c1).await.unwrap(), 2);
    assert_eq!(
        store.chats_of(&a, None, 10).await.unwrap(),
        vec![c1.clone(), c2.clone()]
    );
    assert_eq!(
        store.chats_of(&a, Some(&c1), 10).await.unwrap(),
        vec![c2.clone()]
    );
    assert_eq!(store.chats_of(&a, None, 1).await.unwrap(), vec![c1.clone()]);
    assert_eq!(
        store
            .remove(&c1, &[a.clone(), user("nobody")])
            .await
            .unwrap(),
        1
    );
    assert!(!store.is_member(&c1, &a).await.unwrap());
    assert!(store.is_member(&c1, &b).await.unwrap());
    assert_eq!(store.count(&c1).await.unwrap(), 1);
    assert_eq!(store.chats_of(&a, None, 10).await.unwrap(), vec![c2]);

    // A bulk import larger than one pipeline.
    let many: Vec<UserId> = (0..25_000).map(|i| user(&format!("u{i}"))).collect();
    let big = chat("big");
    assert_eq!(store.add(&big, &many).await.unwrap(), 25_000);
    assert_eq!(store.count(&big).await.unwrap(), 25_000);
    assert!(store.is_member(&big, &many[24_999]).await.unwrap());
    assert_eq!(store.chats_of(&many[7], None, 10).await.unwrap(), vec![big]);

    assert!(!store.is_contact(&a, &b).await.unwrap());
    assert_eq!(
        store
            .add_contacts(&a, std::slice::from_ref(&b))
            .await
            .unwrap(),
        1
    );
    assert!(store.is_contact(&a, &b).await.unwrap());
    assert!(
        !store.is_contact(&b, &a).await.unwrap(),
        "contacts are one-way"
    );
    assert_eq!(
        store
            .remove_contacts(&a, std::slice::from_ref(&b))
            .await
            .unwrap(),
        1
    );
    assert!(!store.is_contact(&a, &b).await.unwrap());
}

#[tokio::test]
async fn memory_members_meet_the_contract() {
    contract(&MemoryMembers::new()).await;
}

#[tokio::test]
async fn redis_members_meet_the_contract_and_keep_their_bucket_count() {
    let redis = Server::redis();
    let conn = connect_redis(&redis.url()).await.unwrap();
    let store = RedisMembers::open(conn.clone(), Some(8)).await.unwrap();
    contract(&store).await;
    // The count is recorded: another one is refused, none takes it.
    let err = RedisMembers::open(conn.clone(), Some(16))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            BucketsError::Mismatch {
                asked: 16,
                recorded: 8
            }
        ),
        "{err}"
    );
    assert_eq!(RedisMembers::open(conn, None).await.unwrap().buckets(), 8);
}

#[tokio::test]
async fn redis_cluster_members_meet_the_contract() {
    let cluster = RedisCluster::start();
    let conn = connect_redis(&cluster.url()).await.unwrap();
    contract(&RedisMembers::open(conn, None).await.unwrap()).await;
}
