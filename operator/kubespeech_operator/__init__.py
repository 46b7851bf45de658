"""kubespeech's control plane: the SpeechDeployment models, pure manifest builders, render, and the kopf operator."""
