//! The namespace node itself: pods reach each other through the node like on a CNI, and
//! everything the harness made is gone afterwards, also after a panic.

use nodeward_tests::netns::{pod_ip, TestNode, PREFIX};
use nodeward_tests::pod_server_bin;

fn namespaces() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_owned)
        .collect()
}

#[test]
fn pods_talk_through_the_node_and_everything_is_removed() {
    let mut node = TestNode::new("topology");
    let server = node.add_pod("server", pod_ip(10));
    let client = node.add_pod("client", pod_ip(11));
    let bin = pod_server_bin();
    let listen = format!("{}:8000", server.ip);
    node.spawn(&server.netns, &bin, &[&listen]);
    let url = format!("http://{}:8000/hello?x=1", server.ip);
    let mut answer = (0, String::new());
    for _ in 0..20 {
        answer = node.curl(&client.netns, "GET", &url, &["X-Test: 1"]);
        if answer.0 == 200 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(answer.0, 200, "{answer:?}");
    let seen: serde_json::Value = serde_json::from_str(&answer.1).expect("pod server JSON");
    assert_eq!(seen["uri"], "/hello?x=1");
    assert_eq!(seen["headers"]["x-test"], "1");
    assert!(
        seen["peer"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&client.ip.to_string()),
        "{seen}"
    );
    let made = [
        node.netns.clone(),
        server.netns.clone(),
        client.netns.clone(),
    ];
    assert!(
        made.iter().all(|n| namespaces().contains(n)),
        "{:?}",
        namespaces()
    );
    drop(node);
    let left: Vec<&String> = made.iter().filter(|n| namespaces().contains(n)).collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
}

#[test]
fn cleanup_also_happens_on_panic() {
    let made = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let mut node = TestNode::new("panic");
        let pod = node.add_pod("doomed", pod_ip(20));
        made.lock()
            .expect("lock")
            .extend([node.netns.clone(), pod.netns]);
        panic!("test failure inside the node");
    });
    assert!(result.is_err());
    let made = made.into_inner().expect("lock");
    assert_eq!(made.len(), 2);
    let left: Vec<&String> = made.iter().filter(|n| namespaces().contains(n)).collect();
    assert!(left.is_empty(), "namespaces left after a panic: {left:?}");
}
