//! One contract, every Bus: memory, and NATS on a real nats-server
//! spawned for the test. What `Bus` and `BusHandler` promise in their
//! docs is checked here: live on return, per-subject order from one
//! publisher, `*` matching with the frame's own subject, no crossing
//! between subjects, unsubscribe, the subscription count, and (NATS)
//! connection state and possible-loss reports across a server restart.
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use switchboard_protocol::{
    SharedFrame,
    v1::{Delivery, ServerFrame, server_frame},
};
use switchboard_router::{Bus, BusHandler, MemoryBus, NatsBus, NatsSettings};
use switchboard_testkit::Server;
use tokio::sync::mpsc;

/// Long enough for a frame that should not arrive to show up.
const QUIET: Duration = Duration::from_millis(300);
const PATIENCE: Duration = Duration::from_secs(10);

/// A frame tagged with `tag` (carried as a delivery's seq).
fn tagged(tag: u64) -> SharedFrame {
    SharedFrame::new(ServerFrame {
        id: 0,
        kind: Some(server_frame::Kind::Delivery(Delivery {
            chat: "contract".into(),
            seq: tag,
            ..Default::default()
        })),
    })
}

struct Recorder {
    frames: mpsc::UnboundedSender<(String, u64)>,
    losses: AtomicUsize,
}

impl BusHandler for Recorder {
    fn on_frame(&self, subject: &str, frame: SharedFrame) {
        let tag = frame.delivery_position().map_or(0, |(_, seq)| seq);
        let _ = self.frames.send((subject.to_owned(), tag));
    }

    fn on_possible_loss(&self) {
        self.losses.fetch_add(1, Ordering::SeqCst);
    }
}

/// A subscribing node and a publishing one (the same bus in memory: one
/// process; two connections over NATS: two nodes).
struct Nodes {
    publisher: Arc<dyn Bus>,
    subscriber: Arc<dyn Bus>,
    recorder: Arc<Recorder>,
    received: mpsc::UnboundedReceiver<(String, u64)>,
}

impl Nodes {
    fn new(publisher: Arc<dyn Bus>, subscriber: Arc<dyn Bus>) -> Nodes {
        let (tx, received) = mpsc::unbounded_channel();
        let recorder = Arc::new(Recorder {
            frames: tx,
            losses: AtomicUsize::new(0),
        });
        subscriber.set_handler(recorder.clone());
        Nodes {
            publisher,
            subscriber,
            recorder,
            received,
        }
    }

    async fn publish(&self, subject: &str, tag: u64) {
        self.publisher.publish(subject, tagged(tag)).await.unwrap();
    }

    async fn next(&mut self) -> (String, u64) {
        self.take(1).await.remove(0)
    }

    async fn take(&mut self, n: usize) -> Vec<(String, u64)> {
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            match tokio::time::timeout(PATIENCE, self.received.recv()).await {
                Ok(Some(frame)) => got.push(frame),
                _ => panic!("{} of {n} frames arrived: {got:?}", got.len()),
            }
        }
        got
    }

    /// Nothing more arrives.
    async fn assert_quiet(&mut self) {
        if let Ok(Some(extra)) = tokio::time::timeout(QUIET, self.received.recv()).await {
            panic!("unexpected frame {extra:?}");
        }
    }
}

fn memory() -> Nodes {
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
    Nodes::new(bus.clone(), bus)
}

async fn nats_node(server: &Server, name: &str) -> Arc<dyn Bus> {
    let bus = NatsBus::connect(&NatsSettings {
        url: server.url(),
        name: name.into(),
        subscription_capacity: 65_536,
    })
    .await
    .unwrap();
    let bus: Arc<dyn Bus> = Arc::new(bus);
    wait_until(|| bus.connected(), "connected").await;
    bus
}

async fn nats(server: &Server) -> Nodes {
    Nodes::new(
        nats_node(server, "publisher").await,
        nats_node(server, "subscriber").await,
    )
}

async fn wait_until(cond: impl Fn() -> bool, what: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "not {what} in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn contract(mut n: Nodes) {
    assert!(n.subscriber.connected());
    assert_eq!(n.subscriber.subscriptions(), 0);

    // Nobody listens: a publish still succeeds (at-most-once, not an error).
    n.publish("sb.chat.nobody", 1).await;

    // Live on return: a publish right after subscribe returns arrives,
    // from another node too. Many fresh subjects, so a subscription that
    // became live a little later would be caught.
    for i in 0..50 {
        let subject = format!("sb.chat.live{i}");
        n.subscriber.subscribe(&subject).await.unwrap();
        n.publish(&subject, i).await;
    }
    let mut got = n.take(50).await;
    got.sort_by_key(|(_, tag)| *tag);
    let want: Vec<(String, u64)> = (0..50).map(|i| (format!("sb.chat.live{i}"), i)).collect();
    assert_eq!(got, want);
    assert_eq!(n.subscriber.subscriptions(), 50);
    for i in 0..50 {
        n.subscriber
            .unsubscribe(&format!("sb.chat.live{i}"))
            .await
            .unwrap();
    }
    assert_eq!(n.subscriber.subscriptions(), 0);

    // One publisher, one subject: publish order.
    n.subscriber.subscribe("sb.chat.order").await.unwrap();
    for tag in 1..=1000 {
        n.publish("sb.chat.order", tag).await;
    }
    let tags: Vec<u64> = n.take(1000).await.into_iter().map(|(_, t)| t).collect();
    assert_eq!(tags, (1..=1000).collect::<Vec<_>>());

    // Subjects do not cross; the handler is told the frame's subject.
    n.subscriber.subscribe("sb.chat.x").await.unwrap();
    n.publish("sb.chat.y", 1).await;
    n.publish("sb.chat.xx", 2).await;
    n.publish("sb.chat.x", 3).await;
    assert_eq!(n.next().await, ("sb.chat.x".to_owned(), 3));

    // `*` stands for exactly one token, and the handler gets the subject
    // the frame was published on (an edge finds the user in it).
    n.subscriber.subscribe("sb.edge.e1.user.*").await.unwrap();
    n.publish("sb.edge.e2.user.bob", 1).await;
    n.publish("sb.edge.e1.user.bob.x", 2).await;
    n.publish("sb.edge.e1.user", 3).await;
    n.publish("sb.edge.e1.user.bob", 4).await;
    assert_eq!(n.next().await, ("sb.edge.e1.user.bob".to_owned(), 4));
    assert_eq!(n.subscriber.subscriptions(), 3);

    // Unsubscribe stops delivery; other subjects go on.
    n.subscriber.unsubscribe("sb.chat.x").await.unwrap();
    assert_eq!(n.subscriber.subscriptions(), 2);
    n.publish("sb.chat.x", 5).await;
    n.publish("sb.chat.order", 6).await;
    assert_eq!(n.next().await, ("sb.chat.order".to_owned(), 6));
    n.assert_quiet().await;
    assert_eq!(n.recorder.losses.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn memory_bus_meets_the_contract() {
    contract(memory()).await;
}

#[tokio::test]
async fn nats_bus_meets_the_contract() {
    let server = Server::nats();
    contract(nats(&server).await).await;
}

/// The part only a real server can show: `connected()` follows the
/// connection, a reconnect is reported as a possible loss, and
/// subscriptions outlive the reconnect.
#[tokio::test]
async fn nats_bus_reports_an_outage_and_keeps_its_subscriptions() {
    let mut server = Server::nats();
    let mut n = nats(&server).await;
    n.subscriber.subscribe("sb.chat.kept").await.unwrap();
    n.publish("sb.chat.kept", 1).await;
    assert_eq!(n.next().await, ("sb.chat.kept".to_owned(), 1));
    assert_eq!(n.recorder.losses.load(Ordering::SeqCst), 0);

    server.kill();
    wait_until(|| !n.subscriber.connected(), "disconnected").await;
    server.restart();
    wait_until(|| n.subscriber.connected(), "reconnected").await;
    wait_until(|| n.publisher.connected(), "publisher reconnected").await;
    // Frames sent while it was down may be gone: the handler is told.
    wait_until(
        || n.recorder.losses.load(Ordering::SeqCst) > 0,
        "told of a possible loss",
    )
    .await;

    // The subscription came back with the connection. Publish until one
    // gets through: the server learns the interest on reconnect.
    let mut tag = 2;
    let got = loop {
        n.publish("sb.chat.kept", tag).await;
        if let Ok(Some(got)) =
            tokio::time::timeout(Duration::from_millis(200), n.received.recv()).await
        {
            break got;
        }
        tag += 1;
        assert!(tag < 50, "the subscription did not come back");
    };
    assert_eq!(got.0, "sb.chat.kept");
    assert_eq!(n.subscriber.subscriptions(), 1);
}
